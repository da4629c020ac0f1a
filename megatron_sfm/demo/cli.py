"""``sfm demo``: the experiment end to end on CPU, on data shipped with the package."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sfm demo",
        description="Filter -> tokenizer -> tokenize -> mix four conditions -> train four tiny models -> "
                    "convert to Hugging Face -> propensity evaluation, on CPU with embedded data "
                    "(--posttrain: then SFT -> DPO -> generate-mode evaluation of every stage). "
                    "A rerun into the same --out skips finished stages; any other non-empty --out is refused.")
    parser.add_argument("--out", default="sfm-demo", help="output folder (default: ./sfm-demo)")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (what the test suite runs)")
    parser.add_argument("--force", action="store_true", help="redo every stage (training resumes each model's checkpoint in runs/; delete runs/ to retrain)")
    parser.add_argument("--train-iters", type=int, default=None, help="override the training length")
    parser.add_argument("--posttrain", action="store_true",
                        help="add the post-training stages: SFT and DPO of the four models on bundled chat and "
                             "preference sets, then generate mode (personas none, ai, helpful, hhh) for base, SFT "
                             "and DPO and the held-out DPO margin (a rerun resumes after the finished stages)")
    args = parser.parse_args(argv)

    from rich.console import Console

    from megatron_sfm.demo.pipeline import DemoRun, DemoSettings

    settings = DemoSettings.fast() if args.fast else DemoSettings()
    if args.train_iters is not None:
        settings.train_iters = args.train_iters
    console = Console()
    out = Path(args.out)
    if not (out / ".stages").is_dir():
        # The demo's own output rule: a folder of an earlier demo run resumes (its finished
        # stages are skipped, --force redoes them); any other non-empty folder is refused.
        from megatron_sfm.errors import SfmError
        from megatron_sfm.utils.io import check_output_dir

        try:
            check_output_dir(out)
        except SfmError:
            raise SfmError(f"--out {out}/: not empty and not an earlier demo run (no .stages/ inside); "
                           "pick another folder") from None
    variant = ("fast" if args.fast else "full") + (", post-training" if args.posttrain else "")
    console.print(f"[bold]megatron-sfm demo[/bold] -> {out} ({variant})")
    run = DemoRun(out, settings, console=console, posttrain=args.posttrain)
    summary = run.run(force=args.force)
    from rich.table import Table

    table = Table(title="demo stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, info in summary.items():
        table.add_row(stage, f"{info.get('seconds', 0):.1f}")
    console.print(table)
    console.print(f"\nresults: {out / 'results' / 'results.md'}, chart: {out / 'results' / 'propensity.png'}, "
                  f"TensorBoard: tensorboard --logdir {out / 'runs'}")
    if args.posttrain:
        console.print(f"post-training: {out / 'results-posttrain' / 'posttrain.md'} (also the last section of "
                      f"results.md), stage comparison: {out / 'results-posttrain' / 'compare-hhh'}/ (one per "
                      f"persona); models: {out / 'sft'}/, {out / 'dpo'}/")
    return 0
