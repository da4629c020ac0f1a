"""Bodies run on every rank by run_distributed (see megatron_sfm.testing.distributed)."""

from __future__ import annotations

import os


def bench_two_ranks(config: str, steps: int, warmup: int, overrides: list | None = None) -> dict:
    from megatron_sfm.benchmark.points import BenchPoint
    from megatron_sfm.benchmark.runner import run_bench

    report = run_bench(config, [BenchPoint("sdpa")], steps=steps, warmup=warmup, overrides=overrides)
    report["rank_env"] = os.environ.get("RANK")
    return report
