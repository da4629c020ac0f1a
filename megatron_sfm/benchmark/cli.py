"""``sfm bench CONFIG.yaml``: training throughput on mock data, one row per backend / sweep point.

Examples::

    sfm bench examples/configs/tiny.yaml --backends sdpa,local --steps 3 --warmup 1 --json bench.json
    sfm bench examples/configs/bench-pythia-1.4b.yaml --backends sdpa,triton,local --measure-peak
    sfm bench cfg.yaml --sweep training.micro_batch_size=1,2,4 --sweep model.seq_length=2048,4096
    torchrun --nproc-per-node 8 -m megatron_sfm.cli bench cfg.yaml --json bench.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

BACKENDS = ("sdpa", "triton", "te", "local")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfm bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("config", help="run config YAML (the data section is ignored: tokens are random)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated attention backends, one row each, in this order ({','.join(BACKENDS)}); "
                             "default: the config's model.attention_backend")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one row per value (repeatable: rows are the product of all sweeps, per backend)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the report here")
    parser.add_argument("--measure-peak", action="store_true",
                        help="also measure a dense matmul peak and report MFU against it")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    return parser


def _backends(text: str | None) -> list[str] | None:
    from megatron_sfm.errors import ConfigError

    if text is None:
        return None
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if not names or unknown:
        raise ConfigError(f"--backends: {', '.join(unknown) or 'empty'} not in {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backends: a backend is listed twice ({text})")
    return names


def _quiet_library_warnings() -> None:
    """Megatron-Core and torch warn at import and on every build about optional packages."""
    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*", ".*is deprecated. Please use.*",
                    ".*Tensor that is not a leaf Tensor is being accessed.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_sfm.benchmark.points import plan_points

    points = plan_points(_backends(args.backends), args.sweep)
    if args.steps < 1 or args.warmup < 0:
        from megatron_sfm.errors import ConfigError

        raise ConfigError(f"--steps {args.steps} --warmup {args.warmup}: need at least 1 timed step and 0 warm-up")
    from megatron_sfm.benchmark.points import point_config

    for point in points:  # config errors before anything heavy is imported
        point_config(args.config, args.overrides, point)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_library_warnings()
    from rich.console import Console

    from megatron_sfm.benchmark.report import render_table, write_report
    from megatron_sfm.benchmark.runner import run_bench

    console = Console(stderr=True)
    leader = _rank() == 0

    def progress(text: str) -> None:
        if leader and not (args.quiet and text.startswith("    ") and ("warm-up" in text or ": step " in text)):
            console.print(text, highlight=False, markup=False)

    try:
        report = run_bench(args.config, points, steps=args.steps, warmup=args.warmup, overrides=args.overrides,
                           measure_peak=args.measure_peak, progress=progress)
        if leader:
            if args.json_out:
                write_report(report, args.json_out)
            out = Console()
            if not out.is_terminal:
                out = Console(width=160)
            out.print(render_table(report))
            for row in report["rows"]:
                if row["status"] != "ok":
                    out.print(f"{row['label']}: error: {row['error']}", highlight=False, markup=False)
            if args.json_out:
                console.print(f"report: {args.json_out}", highlight=False)
    finally:
        if "megatron.core.parallel_state" in sys.modules:  # set up by run_bench
            from megatron_sfm.model.parallel import destroy_parallel

            destroy_parallel()
    return 0 if all(r["status"] == "ok" for r in report["rows"]) else 1
