"""Kernel tests run Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before the kernel modules are imported (Triton decides
between compiling and interpreting when it decorates a kernel); megatron_sfm.kernels
imports them on the first call, so setting it here, at collection time, is early enough.
On a machine with a GPU, ``SFM_KERNEL_TESTS_ON_GPU=1`` leaves it unset and the same tests
run compiled kernels on CUDA tensors.
"""

import os

import pytest
import torch

ON_GPU = os.environ.get("SFM_KERNEL_TESTS_ON_GPU") == "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _one_config_on_gpu(monkeypatch):
    """On a GPU, compile one launch configuration per shape instead of autotuning each."""
    if ON_GPU:
        from megatron_sfm.kernels import attention

        monkeypatch.setattr(attention, "FIXED_BLOCKS", dict(attention.GPU_TEST_BLOCKS))


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (ints as -1), so an unwritten element fails."""
    from megatron_sfm.kernels import attention, cross_entropy

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(attention, "_new_output", poisoned)
    monkeypatch.setattr(cross_entropy, "_new_output", poisoned)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (NaN anywhere gives NaN)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def rel_err():
    return _rel_err
