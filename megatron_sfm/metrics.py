"""Training throughput metrics, computed one way for the trainer and the benchmark.

* tokens/s: tokens of the global batch (samples x sequence length) over the step's
  wall time, all GPUs together.
* TFLOP/s per GPU: Megatron-LM's ``num_floating_point_operations`` for a dense GPT
  (:data:`FLOP_FORMULA_NAME`, implemented in :mod:`megatron_sfm.model.flops`: forward
  + backward, causal attention counts half the score matrix, the logit GEMM counts,
  embedding lookups do not) divided by the time and the number of GPUs.
* MFU: TFLOP/s per GPU over the card's dense peak (:data:`PEAK_TFLOPS`) for the
  precision the GEMMs run in (bf16, or fp8 when FP8 is on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_sfm.config.schema import ModelConfig
from megatron_sfm.model.flops import FLOP_FORMULA_NAME, training_flops

__all__ = ["FLOP_FORMULA_NAME", "PEAK_TFLOPS", "StepMetrics", "peak_tflops", "step_metrics", "gpu_name"]

# Dense (no sparsity) peak TFLOP/s per GPU, by card and GEMM precision.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0, "tf32": 494.5},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0, "tf32": 494.5},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0, "tf32": 494.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 51.0, "tf32": 378.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0},
}
DEFAULT_CARD = "H100 SXM"


def gpu_name() -> Optional[str]:
    """The CUDA device's name (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def card_for(device_name: Optional[str]) -> str:
    """Map a CUDA device name onto a key of :data:`PEAK_TFLOPS` (default H100 SXM)."""
    name = (device_name or "").upper()
    if "GH200" in name:
        return "GH200"
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIE" in name:
        return "H100 PCIe"
    if "A100" in name:
        return "A100"
    return DEFAULT_CARD


def peak_tflops(precision: str = "bf16", device_name: Optional[str] = None, override: Optional[float] = None) -> float:
    """Dense peak TFLOP/s per GPU for GEMMs in ``precision`` (``bf16``, ``fp8``, ...)."""
    if override is not None:
        return float(override)
    table = PEAK_TFLOPS[card_for(device_name)]
    return table.get(precision, table["bf16"])


@dataclass
class StepMetrics:
    tokens_per_s: float  # all GPUs together
    tflops_per_gpu: float
    mfu: float  # fraction of peak (0..1)
    flops_per_step: float  # model FLOPs of the whole global batch
    peak_tflops: float
    formula: str = FLOP_FORMULA_NAME

    def as_dict(self) -> dict:
        return asdict(self)


def step_metrics(model: ModelConfig, global_batch_size: int, seq_length: int, step_time_s: float,
                 num_gpus: int, *, precision: Optional[str] = None, tensor_parallel_size: int = 1,
                 peak: Optional[float] = None, device_name: Optional[str] = None) -> StepMetrics:
    """Throughput of one optimizer step over ``global_batch_size`` sequences of ``seq_length``.

    ``step_time_s`` is the step's wall time in seconds; ``num_gpus`` the world size.
    ``precision`` defaults to fp8 when FP8 is on, else the model's precision.
    """
    if step_time_s <= 0:
        raise ValueError(f"step time must be positive, got {step_time_s}")
    if precision is None:
        precision = "fp8" if model.fp8.format != "none" else model.precision
    flops = training_flops(model, global_batch_size, seq_length, tensor_parallel_size)
    tokens = global_batch_size * seq_length
    tflops_per_gpu = flops / step_time_s / num_gpus / 1e12
    p = peak_tflops(precision, device_name if device_name is not None else gpu_name(), peak)
    return StepMetrics(tokens_per_s=tokens / step_time_s, tflops_per_gpu=tflops_per_gpu,
                       mfu=tflops_per_gpu / p, flops_per_step=flops, peak_tflops=p)
