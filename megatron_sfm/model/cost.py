"""Run cost: tokens x training FLOPs per token / sustained TFLOP/s per GPU -> GPU-hours.

The throughput is either given (``--tflops``, e.g. a published number) or read from an
``sfm bench`` JSON report (``--bench``): the TFLOP/s per GPU of one of its rows (the
fastest ``ok`` row unless a label is named). TFLOP/s, not tokens/s, carries over from a
benchmark shape to the full model: the bench configs keep the real layer shapes
(hidden, heads, FFN, vocabulary, sequence, micro-batch) with fewer layers, and the FLOP
count (Megatron-LM's formula, as everywhere here) scales the per-layer work back up.
That assumes the per-layer efficiency of the short model; pipeline bubbles, data-parallel
communication and checkpoint stalls of a multi-node run come on top.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_sfm.errors import SfmError


@dataclass
class Throughput:
    tflops_per_gpu: float
    source: str  # where the number comes from, for the table and the JSON


@dataclass
class CostEstimate:
    tokens: float
    flops_per_token: float
    total_flops: float
    tflops_per_gpu: float
    throughput_source: str
    gpu_hours: float
    gpus: Optional[int]
    wall_hours: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length")


def throughput_from_bench(path: str | Path, label: Optional[str] = None, model=None) -> Throughput:
    """TFLOP/s per GPU of one row of an ``sfm bench`` report (fastest ok row by default).

    With ``model`` (a ModelConfig), the row must have been measured on the same layer shape
    (hidden size, heads, FFN, sequence length; the number of layers may differ): a
    throughput measured on another shape does not transfer.
    """
    from megatron_sfm.benchmark.report import check_report

    path = Path(path)
    from megatron_sfm.utils.readers import read_json

    report = read_json(path, key="--bench", expect=None)
    problems = check_report(report) if isinstance(report, dict) else ["not a JSON object"]
    if problems:
        raise SfmError(f"{path}: not an sfm bench report ({problems[0]})")
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if label is not None:
        rows = [r for r in rows if r["label"] == label]
        if not rows:
            known = ", ".join(r["label"] for r in report["rows"])
            raise SfmError(f"{path}: no ok row labelled {label!r} (rows: {known})")
    if not rows:
        raise SfmError(f"{path}: no row of this report finished (status ok)")
    row = max(rows, key=lambda r: r["tflops_per_gpu"])
    if model is not None:
        measured = {k: report["model"].get(k) for k in SHAPE_FIELDS}
        measured["seq_length"] = row["seq_length"]
        wanted = {"hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
                  "ffn_hidden_size": model.ffn_size, "seq_length": model.seq_length}
        diff = [f"{k} {measured[k]} (model: {wanted[k]})" for k in SHAPE_FIELDS if measured[k] != wanted[k]]
        if diff:
            raise SfmError(f"{path}: row {row['label']!r} was measured on another shape: {', '.join(diff)} "
                           f"(--bench-any-shape to use it anyway)")
    device = report["device"]
    source = (f"{path.name}: row {row['label']!r}, {device.get('name') or device['type']} x{device['world_size']}, "
              f"{report['created'][:10]}")
    return Throughput(float(row["tflops_per_gpu"]), source)


def estimate(flops_per_token: float, tokens: float, throughput: Throughput,
             gpus: Optional[int] = None) -> CostEstimate:
    """GPU-hours (and wall hours on ``gpus`` GPUs) for ``tokens`` training tokens."""
    if not math.isfinite(tokens) or tokens <= 0:
        raise SfmError(f"--tokens: must be positive, got {tokens:g}")
    if not math.isfinite(throughput.tflops_per_gpu) or throughput.tflops_per_gpu <= 0:
        raise SfmError(f"throughput: TFLOP/s per GPU must be positive, got {throughput.tflops_per_gpu:g}")
    if gpus is not None and gpus <= 0:
        raise SfmError(f"--gpus: must be positive, got {gpus}")
    total = flops_per_token * tokens
    gpu_hours = total / (throughput.tflops_per_gpu * 1e12) / 3600
    return CostEstimate(tokens=tokens, flops_per_token=flops_per_token, total_flops=total,
                        tflops_per_gpu=throughput.tflops_per_gpu, throughput_source=throughput.source,
                        gpu_hours=gpu_hours, gpus=gpus, wall_hours=gpu_hours / gpus if gpus else None)
