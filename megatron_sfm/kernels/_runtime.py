"""Where the Triton kernels can run, and the error raised when they cannot.

The kernels run on a CUDA GPU, or on the CPU through Triton's interpreter when the
environment variable ``TRITON_INTERPRET=1`` is set *before* the kernel modules are
imported (Triton decides between compiling and interpreting when it decorates a kernel).
The kernel modules (``_attention_kernels``, ``_cross_entropy_kernels``) are therefore
imported lazily, on the first call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch


class KernelUnavailableError(RuntimeError):
    """A fused kernel was called where Triton cannot run it (no GPU, no interpreter)."""


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_available(device: torch.device | str) -> bool:
    """True when the fused kernels can run on tensors on ``device``."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreter_enabled():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def load_kernel_module(name: str, what: str, *tensors: torch.Tensor):
    """Import ``megatron_sfm.kernels.<name>`` after checking the tensors can use it.

    Raises :class:`KernelUnavailableError` naming ``what`` when the tensors are not on a
    CUDA device and the interpreter is off, when Triton is missing, or when the module
    was compiled for one mode and is now asked to run in the other.
    """
    interpret = interpreter_enabled()
    for t in tensors:
        if t.device.type != "cuda" and not interpret:
            raise KernelUnavailableError(
                f"{what}: Triton kernels need a CUDA GPU (got a tensor on {t.device}); on a CPU set "
                "TRITON_INTERPRET=1 before importing triton, or use the PyTorch reference path")
    try:
        module = importlib.import_module(f"megatron_sfm.kernels.{name}")
    except ImportError as exc:  # triton missing or broken
        raise KernelUnavailableError(f"{what}: Triton is not importable ({exc})") from exc
    if module.INTERPRETED != interpret:
        state = "set" if interpret else "unset"
        raise KernelUnavailableError(
            f"{what}: TRITON_INTERPRET is {state} now but was not when megatron_sfm.kernels.{name} "
            "was imported; set it before the first kernel call")
    return module


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def autotune_kwargs() -> dict:
    """Extra ``triton.autotune`` arguments this Triton supports: on-disk result caching."""
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}
