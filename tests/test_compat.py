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


# ---- one test per workaround called from the package (docs/megatron-core-compat.md) ------

def _source(module_name: str, qualname: str) -> str:
    """The source of a function as in the installed file (not a possibly patched attribute)."""
    module = importlib.import_module(module_name)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(inspect.unwrap(obj))


def test_w_logits_gpt_model_still_copies_logits_without_labels():
    """W-logits is needed while GPTModel transposes (copies) the logits when called without labels
    and hands [s, b, V] logits to compute_language_model_loss when called with them."""
    src = _source("megatron.core.models.gpt.gpt_model", "GPTModel._postprocess")
    assert "return logits.transpose(0, 1).contiguous()" in src
    assert "self.compute_language_model_loss(labels, logits)" in src

    class Model:
        def compute_language_model_loss(self, labels, logits):
            return "loss"

    m = Model()
    compat.install_logits_output(m)
    assert compat.returns_logits_in_sb_order(m) and m.compute_language_model_loss(None, "logits") == "logits"
    compat.remove_logits_output(m)
    assert not compat.returns_logits_in_sb_order(m) and m.compute_language_model_loss(None, "x") == "loss"


def test_w_release_rotary_cache_and_ddp_grad_accs_still_exist():
    """W-release cuts Megatron's class-level rotary lru_cache and DDP's grad_accs; the leak itself
    (and that it disappears with the release) is tests/training/test_release.py, whose
    test_without_release_the_first_state_outlives_gc fails when the workaround is no longer needed."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    assert hasattr(RotaryEmbedding.forward, "cache_clear")
    assert "self.grad_accs = []" in inspect.getsource(DistributedDataParallel.__init__)
    assert hasattr(DistributedDataParallel, "disable_forward_pre_hook")


def test_w_dopt_empty_fresh_distributed_optimizer_cannot_describe_its_state_for_loading(single_process_parallel):
    """Without W-dopt-empty, a fresh distributed optimizer's loading path asserts (0.16.1);
    with it, it gives its sharded state dict. Fails when Megatron initialises the state itself."""
    from pathlib import Path

    from megatron_sfm.config.loader import load_config
    from megatron_sfm.training.checkpoint import DOPT_METADATA, model_sharded_state_dict
    from megatron_sfm.training.state import build_training_state, release_training_state

    tiny = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["checkpoint.save=null", "model.seq_length=32"])
    state = build_training_state(cfg, with_data=False)
    try:
        model_sd = {}
        for chunk_sd in model_sharded_state_dict(state).values():
            model_sd.update(chunk_sd)
        with pytest.raises(AssertionError):
            state.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=DOPT_METADATA)
        compat.prepare_optimizer_for_loading(state.optimizer)
        assert "optimizer" in state.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=DOPT_METADATA)
    finally:
        release_training_state(state)


def test_w_dcp_log_torch_checkpoint_loader_logs_on_the_root_logger():
    """W-dcp-log is needed while torch.distributed.checkpoint's loader logs tracebacks on the root logger."""
    import logging

    from torch.distributed.checkpoint import state_dict_loader

    assert state_dict_loader.logger is logging.getLogger()
    assert "exc_info=True" in inspect.getsource(state_dict_loader)
    root = logging.getLogger()
    before = root.level
    with compat.quiet_root_logger():
        assert root.level == logging.ERROR
    assert root.level == before


def test_w_attn_self_attention_forward_still_rotates_in_pytorch_with_the_same_signature():
    """W-attn overrides SelfAttention.forward: needed while Megatron rotates q/k in PyTorch before
    core attention; fails when the signature or the attributes the override reads change."""
    from megatron.core.transformer.attention import Attention, SelfAttention

    from megatron_sfm.compat.attention import FusedRotarySelfAttention

    ours = list(inspect.signature(FusedRotarySelfAttention.forward).parameters)
    assert list(inspect.signature(SelfAttention.forward).parameters) == ours
    forward = inspect.getsource(Attention.forward)
    assert "apply_rotary_pos_emb(" in forward and "self.get_query_key_value_tensors(" in forward
    init = inspect.getsource(Attention.__init__)
    for name in ("offload_qkv_linear", "offload_core_attention", "offload_attn_proj"):
        assert f"self.{name}" in init, name
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding

    assert hasattr(yarn_rotary_pos_embedding, "_yarn_get_concentration_factor_from_config")


def test_no_megatron_private_names_outside_compat():
    """The workarounds' Megatron-Core internals are reached only from megatron_sfm/compat/."""
    from pathlib import Path

    package = Path(compat.__file__).resolve().parents[1]
    needles = ("_init_optimizer_states_with_dummy_values", "compute_language_model_loss =", "grad_accs",
               "logging.getLogger()", "forward.cache_clear", "_yarn_get_concentration_factor_from_config")
    offenders = []
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] == "compat":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(package)}: {n}" for n in needles if n in text]
    assert offenders == []
