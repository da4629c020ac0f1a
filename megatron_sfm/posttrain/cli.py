"""``sfm posttrain``: SFT and DPO on a Hugging Face export, with TRL.

    sfm posttrain sft HF_DIR  --data FILE[:WEIGHT]... --out DIR [--config YAML]
                              [--eval-data FILE[:WEIGHT]...] [--overwrite] [--no-progress] [key=value ...]
    sfm posttrain dpo SFT_DIR --data FILE[:WEIGHT]... --out DIR [same options]

Several GPUs: ``accelerate launch --config_file examples/accelerate/fsdp.yaml -m
megatron_sfm.cli posttrain sft ...`` (docs/posttraining.md). Only argument parsing
lives here; torch, transformers and TRL are imported when a stage runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")
_STAGES = {
    "sft": ("HF_DIR", "supervised fine-tuning on chat conversations (messages)",
            "the model to fine-tune: a Hugging Face folder (e.g. from sfm convert to-hf)"),
    "dpo": ("SFT_DIR", "direct preference optimisation on chosen/rejected pairs",
            "the model to train and the frozen reference: usually an sfm posttrain sft output"),
}


def _usage() -> str:
    return "\n".join([
        "usage: sfm posttrain {sft,dpo} MODEL --data FILE[:WEIGHT]... --out DIR [options] [key=value ...]",
        "",
        "SFT and DPO on a Hugging Face export (TRL)",
        "",
        "commands:",
        *(f"  {name}  {help_text}" for name, (_, help_text, _) in _STAGES.items()),
        "",
        "Run 'sfm posttrain sft --help' for the options; docs/posttraining.md for formats and rules.",
    ])


def build_parser(stage: str) -> argparse.ArgumentParser:
    metavar, help_text, model_help = _STAGES[stage]
    p = argparse.ArgumentParser(
        prog=f"sfm posttrain {stage}", description=help_text,
        epilog="key=value overrides set stage config fields (e.g. learning_rate=1e-5 max_steps=100); "
               "precedence: --config file < key=value < the model argument, --data, --eval-data, --out. "
               "Several GPUs: accelerate launch --config_file examples/accelerate/fsdp.yaml -m megatron_sfm.cli "
               f"posttrain {stage} ...")
    p.add_argument("model", metavar=metavar, help=model_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="stage config overrides")
    p.add_argument("--data", nargs="+", action="extend", metavar="FILE[:WEIGHT]",
                   help="training files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet); WEIGHT multiplies a file's "
                        "examples per epoch (default 1; 0.5 = a fixed half, 2 = twice)")
    p.add_argument("--eval-data", nargs="+", action="extend", metavar="FILE[:WEIGHT]",
                   help="evaluation files (same formats), evaluated every eval_steps")
    p.add_argument("--out", help="output folder: final model, posttrain.json, checkpoints/, tensorboard/ "
                                 "(missing, empty, or an unfinished run of this stage to resume)")
    p.add_argument("--config", metavar="YAML", help="stage config file (e.g. examples/pythia-6.9b/posttrain-"
                                                   f"{stage}.yaml); fields in docs/posttraining.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever --out holds (a finished run, another stage, other files) and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the summary at the end stays)")
    return p


def _split_overrides(values: list[str] | None, overrides: list[str]) -> list[str] | None:
    """``--data a b key=value``: argparse gives ``key=value`` to --data; move it back unless it is a file."""
    if values is None:
        return None
    kept = []
    for value in values:
        if _OVERRIDE_RE.match(value) and not Path(value).exists():
            overrides.append(value)
        else:
            kept.append(value)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in _STAGES:
        print(f"error: unknown posttrain command {stage!r}; known: {', '.join(_STAGES)}", file=sys.stderr)
        return 2
    # First thing after the usage checks: a SIGTERM/SIGUSR1 while the stage starts (imports,
    # model load) or trains must end in "save if anything was trained, exit 75"
    # (posttrain/stop.py), not in a killed process.
    from megatron_sfm.training.signals import SignalFlag, requeue_exit_code

    flag = SignalFlag().install()
    try:
        args = build_parser(stage).parse_intermixed_args(rest)
        overrides = list(args.overrides)
        data = _split_overrides(args.data, overrides)
        eval_data = _split_overrides(args.eval_data, overrides)

        from megatron_sfm.posttrain.config import load_stage_config

        cfg = load_stage_config(stage, args.config, overrides, model=args.model, out=args.out, data=data,
                                eval_data=eval_data)
        from megatron_sfm.posttrain import run
        from megatron_sfm.posttrain.stop import StoppedForRequeue

        runner = run.run_sft if stage == "sft" else run.run_dpo
        try:
            runner(cfg, progress=not args.no_progress, overwrite=args.overwrite, signal_flag=flag)
        except StoppedForRequeue as stop:
            print(f"sfm posttrain {stage}: {stop}; exiting with {requeue_exit_code()} (requeue); "
                  "the same command resumes", file=sys.stderr, flush=True)
            flag.hold()  # ignore further signals until the process has exited with the requeue code
            return requeue_exit_code()
        return 0
    finally:
        flag.restore()
