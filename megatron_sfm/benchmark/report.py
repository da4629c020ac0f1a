"""The ``sfm bench`` report: its schema, a check of it, JSON output and the summary table.

The report is the dict :func:`megatron_sfm.benchmark.runner.run_bench` returns; its
fields are documented in docs/benchmarking.md and checked by :func:`check_report`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from megatron_sfm.benchmark import SCHEMA

# field -> accepted types (None allowed where listed). Kept in step with docs/benchmarking.md.
NUM = (int, float)
TOP_LEVEL: dict[str, tuple] = {
    "schema": (str,), "created": (str,), "command": (str,), "config": (str, type(None)), "overrides": (list,),
    "steps": (int,), "warmup": (int,), "flop_formula": (str,), "aggregation": (str,),
    "ratio_baseline": (str, type(None)), "device": (dict,), "parallel": (dict,), "peak": (dict,),
    "model": (dict,), "versions": (dict,), "wall_time_s": NUM, "rows": (list,),
}
ROW_ALWAYS: dict[str, tuple] = {
    "label": (str,), "backend": (str,), "overrides": (dict,), "status": (str,), "error": (str, type(None)),
    "precision": (str,), "micro_batch_size": (int,), "global_batch_size": (int,), "seq_length": (int,),
    "tokens_per_step": (int,), "throughput_ratio": NUM + (type(None),), "fp8": (str, type(None)),
}
ROW_OK: dict[str, tuple] = {
    "main_params_dtype": (str,), "num_microbatches": (int,), "data_parallel_size": (int,), "timed_steps": (int,),
    "step_time_s": (dict,), "tokens_per_s": NUM, "tokens_per_s_per_gpu": NUM, "tflops_per_gpu": NUM,
    "flops_per_step": NUM, "peak_tflops_table": NUM, "mfu": NUM, "peak_tflops_measured": NUM + (type(None),),
    "mfu_measured": NUM + (type(None),), "time_split_s": (dict,), "time_split_fraction": (dict,),
    "memory": (dict,), "loss": NUM, "skipped_steps": (int,),
}
STEP_TIME_KEYS = ("mean", "median", "min", "max")
SPLIT_KEYS = ("forward", "backward", "optimizer")
MEMORY_KEYS = ("peak_allocated_gib", "peak_reserved_gib", "rss_gib")
DEVICE_KEYS = ("type", "name", "world_size", "peak_table_card")


def check_report(report: dict) -> list[str]:
    """Problems with ``report`` against the schema (empty when it conforms)."""
    problems = []

    def check(obj: dict, spec: dict, where: str):
        for key, types in spec.items():
            if key not in obj:
                problems.append(f"{where}: missing {key}")
            elif isinstance(obj[key], bool) or not isinstance(obj[key], types):
                problems.append(f"{where}.{key}: {type(obj[key]).__name__} is not {'/'.join(t.__name__ for t in types)}")

    check(report, TOP_LEVEL, "report")
    if report.get("schema") != SCHEMA:
        problems.append(f"report.schema: {report.get('schema')!r} is not {SCHEMA!r}")
    for key in DEVICE_KEYS:
        if key not in report.get("device", {}):
            problems.append(f"report.device: missing {key}")
    for i, row in enumerate(report.get("rows", [])):
        where = f"rows[{i}]"
        check(row, ROW_ALWAYS, where)
        if row.get("status") not in ("ok", "error"):
            problems.append(f"{where}.status: {row.get('status')!r} is not 'ok' or 'error'")
        if row.get("status") != "ok":
            continue
        check(row, ROW_OK, where)
        for key, sub in (("step_time_s", STEP_TIME_KEYS), ("time_split_s", SPLIT_KEYS),
                         ("time_split_fraction", SPLIT_KEYS), ("memory", MEMORY_KEYS)):
            for k in sub:
                if k not in row.get(key, {}):
                    problems.append(f"{where}.{key}: missing {k}")
        for key in ("tokens_per_s", "tflops_per_gpu", "mfu"):
            value = row.get(key)
            if isinstance(value, NUM) and not (math.isfinite(value) and value > 0):
                problems.append(f"{where}.{key}: {value} is not a positive finite number")
    return problems


def write_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report as JSON, atomically."""
    from megatron_sfm.utils.io import write_json

    write_json(path, report)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def render_table(report: dict):
    """A rich Table: one line per row, ratios against the report's baseline row."""
    from rich.table import Table

    dev = report["device"]
    title = (f"sfm bench: {dev['name']} x{dev['world_size']} ({dev['type']}), "
             f"{report['steps']} timed steps after {report['warmup']} warm-up")
    table = Table(title=title, caption=f"FLOPs: {report['flop_formula']}; {report['aggregation']}")
    for name in ("row", "prec", "tokens/s/GPU", "ratio", "TFLOP/s/GPU", "MFU", "MFU meas.", "step ms",
                 "fwd/bwd/opt ms", "peak GiB"):
        table.add_column(name, justify="left" if name == "row" else "right")
    for row in report["rows"]:
        if row["status"] != "ok":
            table.add_row(row["label"], row["precision"], "error", "-", "-", "-", "-", "-", "-", "-")
            continue
        split = row["time_split_s"]
        mem = row["memory"]
        peak = mem["peak_allocated_gib"] if mem["peak_allocated_gib"] is not None else mem["rss_gib"]
        table.add_row(
            row["label"], f"{row['precision']}/{row['main_params_dtype']}" + (" fp8" if row.get("fp8") else ""), f"{row['tokens_per_s_per_gpu']:,.0f}",
            _fmt(row["throughput_ratio"], ".2f"), f"{row['tflops_per_gpu']:.2f}", f"{row['mfu'] * 100:.1f}%",
            _fmt(None if row["mfu_measured"] is None else row["mfu_measured"] * 100, ".1f"),
            f"{row['step_time_s']['mean'] * 1000:.1f}",
            "/".join(f"{split[k] * 1000:.1f}" for k in SPLIT_KEYS), _fmt(peak, ".2f"))
    return table


def load_report(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
