"""The Megatron-Core workarounds target the pinned version and are still needed.

If megatron-core changes under us, these fail loudly: a patched function has moved, or a
CUDA literal the shims exist for is gone (then the shim is dead code to remove).
"""

import importlib
import inspect

import pytest
import torch

from megatron_sfm import compat


def test_pinned_version():
    assert compat.megatron_core_version() == compat.PINNED_MEGATRON_CORE == "0.16.1"


def test_pin_in_setup_matches():
    from pathlib import Path

    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert f'"megatron-core=={compat.PINNED_MEGATRON_CORE}"' in setup


@pytest.mark.parametrize("module", compat.CUDA_STRING_MODULES)
def test_each_proxied_module_still_hard_codes_cuda(module):
    source = inspect.getsource(importlib.import_module(module))
    assert 'device="cuda"' in source or "device='cuda'" in source or 'device = "cuda"' in source


def test_patched_targets_exist_with_expected_shape():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mp_random

    assert "torch.cuda.current_device()" in inspect.getsource(RotaryEmbedding.get_emb)
    assert hasattr(mp_random, "_get_cuda_rng_state") and hasattr(mp_random, "_set_cuda_rng_state")
    # read the file, not the (possibly already patched) method
    src = inspect.getsource(importlib.import_module("megatron.core.optimizer.distrib_optimizer"))
    body = src[src.index("def _set_main_param_and_optimizer_states"):]
    body = body[: body.index("\n    def ", 10)]
    assert "for key in dst_tensors:" in body and "dst_tensors[key].copy_(tensors[key])" in body
    assert hasattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims apply only without CUDA")
def test_cpu_shims_make_cuda_literals_run():
    compat.apply_all()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert getattr(schedules.torch, "__sfm_proxy__", False)
    assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")
def test_default_backend_is_gloo_on_cpu():
    assert compat.default_backend() == "gloo"
