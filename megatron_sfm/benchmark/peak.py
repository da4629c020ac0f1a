"""A measured dense-matmul ceiling, for MFU against what the card actually delivers.

On CUDA: the median of timed ``torch.matmul`` calls on random (never zero) square
matrices of ``size`` (default 8192) in the requested dtype, each timed with CUDA events
after warm-up, rotating among three input pairs. On the CPU: the same with the host
clock and size 512. Returns TFLOP/s (2 * size^3 FLOPs per product).
"""

from __future__ import annotations

import statistics
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_matmul_tflops(precision: str = "bf16", *, size: int | None = None, repeats: int = 20,
                          warmup: int = 5, device: torch.device | None = None) -> float:
    """Median TFLOP/s of ``size`` x ``size`` x ``size`` products in ``precision``."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_cuda = device.type == "cuda"
    dtype = DTYPES.get(precision, torch.bfloat16)
    if not on_cuda and dtype != torch.float32:
        dtype = torch.float32  # CPU half-precision GEMMs are not what a CPU run trains with
    if size is None:
        size = 8192 if on_cuda else 512
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    pairs = [(torch.randn(size, size, device=device, dtype=dtype, generator=generator),
              torch.randn(size, size, device=device, dtype=dtype, generator=generator)) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = []
    for i in range(warmup + repeats):
        a, b = pairs[i % len(pairs)]
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    del pairs, out
    if on_cuda:
        torch.cuda.empty_cache()
    return 2.0 * size ** 3 / statistics.median(times) / 1e12
