"""Every workaround megatron-sfm needs for Megatron-Core 0.16.1 (and torch), in one place.

Megatron-Core assumes CUDA in a few places, its distributed-optimizer resume path has
bugs with torch's Adam, and a few of its internals have to be reached into. Nothing
here edits Megatron-Core's files: each workaround is a function or a subclass here,
named after its entry in ``docs/megatron-core-compat.md`` (which follows
``docs/megatron-core-compat.md``); the rest of the package calls these and touches no
Megatron-Core private name itself.

* :func:`apply_cpu_shims` runs only when CUDA is unavailable (CPU + gloo): S-dev,
  S-sync, S-cudastr, S-type, S-rng, S-cuda().
* :func:`apply_megatron_fixes` runs everywhere: S-dopt-load (distributed optimizer
  resume with torch Adam).
* Called where needed: :func:`install_logits_output` / :func:`remove_logits_output`
  (W-logits), :func:`release_model_references` (W-release),
  :func:`prepare_optimizer_for_loading` (W-dopt-empty), :func:`quiet_root_logger`
  (W-dcp-log), and :mod:`megatron_sfm.compat.attention` (W-attn: the fused-rotary
  ``SelfAttention.forward``).

``tests/test_compat.py`` checks that every patched target still exists and still needs
the workaround, so a change of the pinned version fails loudly instead of silently.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

PINNED_MEGATRON_CORE = "0.16.1"

# Modules whose module-global ``torch`` is replaced by a proxy that maps device="cuda" to
# the CPU (S-cudastr). Each one is needed: schedules (token counter), optimizer (scalars),
# clip_grads and utils (norm buffers), transformer.utils (default causal mask).
CUDA_STRING_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)

_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand", "randn", "randint", "as_tensor")

_applied: set[str] = set()


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_pinned_version() -> None:
    """Fail loudly if the installed Megatron-Core is not the version these shims target."""
    found = megatron_core_version()
    if found != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron-sfm's compatibility shims target megatron-core=={PINNED_MEGATRON_CORE}, "
            f"found {found}: re-check megatron_sfm/compat/ against the new version")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _make_cpu_torch_proxy() -> types.ModuleType:
    """A stand-in for the ``torch`` module whose factory functions ignore device='cuda'."""
    proxy = types.ModuleType("torch")

    def getattr_(name):
        return getattr(torch, name)

    proxy.__getattr__ = getattr_  # type: ignore[attr-defined]
    for name in _FACTORIES:
        original = getattr(torch, name)

        def factory(*args, __original=original, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return __original(*args, **kwargs)

        setattr(proxy, name, factory)
    proxy.__sfm_proxy__ = True  # type: ignore[attr-defined]
    return proxy


def apply_cpu_shims() -> bool:
    """Make Megatron-Core 0.16.1 run on a CPU-only torch with gloo.

    Returns True when the shims were applied (CUDA unavailable), False otherwise.
    Idempotent.
    """
    if torch.cuda.is_available():
        return False
    if "cpu" in _applied:
        return True
    check_pinned_version()
    import importlib

    # S-dev: "current device" is the CPU (global memory buffer, DDP buffers, rotary inv_freq).
    torch.cuda.current_device = lambda: torch.device("cpu")
    # S-sync: nothing to synchronise (p2p batch sync, timers, dist_checkpointing save).
    torch.cuda.synchronize = lambda *a, **k: None

    # S-cudastr: device="cuda" literals in module code.
    proxy = _make_cpu_torch_proxy()
    for name in CUDA_STRING_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy

    # S-type: Megatron asserts param.type() == 'torch.cuda.FloatTensor' (optimizer wrappers,
    # clip_grads). Only the no-argument form is answered with the CUDA name.
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def tensor_type(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch.") \
                and not result.startswith("torch.cuda."):
            return "torch.cuda." + result[len("torch."):]
        return result

    torch.Tensor.type = tensor_type

    # S-rng: the model-parallel RNG tracker keeps "CUDA" states; on CPU they are CPU states.
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # Each fork that draws numbers logs that the CPU state changed: expected on CPU.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)

    # S-cuda(): .cuda() keeps tensors where they are (tied embeddings with PP>1, the
    # distributed optimizer's reshardable checkpoint path).
    torch.Tensor.cuda = lambda self, *a, **k: self

    _applied.add("cpu")
    return True


def apply_megatron_fixes() -> None:
    """Fix the distributed optimizer's resume path with torch Adam (S-dopt-load).

    0.16.1 copies every key of a param's optimizer state from the loaded tensors (a
    KeyError for 'step', or an in-place copy into a leaf view), and puts one shared
    ``step`` tensor into every param's state, so torch Adam increments it once per
    param and the first resumed step is silently wrong. Idempotent.
    """
    if "dopt" in _applied:
        return
    check_pinned_version()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return _original_set(self, model_param, tensors)
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key in destination:
                    destination[key].copy_(value)

    def load_state_dict(self, state_dict):
        _original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()

    _original_set = DistributedOptimizer._set_main_param_and_optimizer_states
    _original_load = DistributedOptimizer.load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict
    _applied.add("dopt")


def apply_all() -> None:
    """Apply every shim this machine needs (CPU shims only without CUDA)."""
    apply_cpu_shims()
    apply_megatron_fixes()


def default_backend() -> str:
    """torch.distributed backend for this machine: NCCL with CUDA, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """Where this rank's model lives."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- W-logits: GPTModel's logits in [s, b, V] for the fused cross-entropy ---------------

def _logits_in_sb_order(labels, logits):  # noqa: ARG001 - the signature of compute_language_model_loss
    return logits


def install_logits_output(gpt_model) -> None:
    """Make ``gpt_model(..., labels=...)`` return its logits ``[s, b, V]`` instead of a loss.

    Megatron-Core 0.16.1's ``GPTModel._postprocess`` returns ``logits.transpose(0, 1).contiguous()``
    (a full copy of the logits, and another of their gradient) when called without
    labels; with labels it hands the ``[s, b, V]`` logits to
    ``self.compute_language_model_loss(labels, logits)``. Overriding that method on this
    instance (not on the class) lets the fused loss read the logits where they are.
    :func:`remove_logits_output` undoes it.
    """
    gpt_model.compute_language_model_loss = _logits_in_sb_order


def remove_logits_output(gpt_model) -> None:
    if gpt_model.__dict__.get("compute_language_model_loss") is _logits_in_sb_order:
        del gpt_model.compute_language_model_loss


def returns_logits_in_sb_order(gpt_model) -> bool:
    return gpt_model.__dict__.get("compute_language_model_loss") is _logits_in_sb_order


# ---- W-release: references that keep a finished model alive ---------------------------

def release_model_references(model_chunks: list, configs: list, config_hooks: tuple) -> None:
    """Cut the references through which Megatron-Core 0.16.1 keeps a finished model alive.

    * the model config's callables (``config_hooks``, e.g. ``grad_scale_func`` =
      ``optimizer.scale_loss``): with fp32 parameters the distributed optimizer's shards
      are autograd views of the parameters, whose graph leads to each parameter's
      grad-accumulator node and DDP's hook on it (C++ links the collector cannot see):
      model -> config -> optimizer -> view -> node -> hook -> model, never collected;
    * ``RotaryEmbedding.forward`` (and YaRN's) is an ``lru_cache`` on the class keyed by
      the module: cleared class-wide (other live models recompute their tables once);
    * DDP's ``grad_accs`` and, with ``overlap_param_gather``, its forward pre-hooks
      (cycles through the DDP module, cut so the collector need not find them).
    """
    cleared: set = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            clear_cache = getattr(type(module).forward, "cache_clear", None)
            if clear_cache is not None and type(module) not in cleared:
                clear_cache()
                cleared.add(type(module))
        if getattr(chunk, "use_forward_hook", False) and chunk.remove_forward_pre_hook_handles:
            chunk.disable_forward_pre_hook(param_sync=False)
        accs = getattr(chunk, "grad_accs", None)
        if isinstance(accs, list):
            accs.clear()
    for config in configs:
        if config is None:
            continue
        for name in config_hooks:
            if hasattr(config, name):
                setattr(config, name, None)


# ---- W-dopt-empty: a fresh distributed optimizer cannot describe its state for loading ---

def prepare_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer (no Adam state yet) placeholder state to load into.

    0.16.1's ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` with the
    ``fully_reshardable`` format calls ``state_dict()``, which asserts on the ``step`` of
    the (empty) Adam state; only the ``fsdp_dtensor`` path initialises it. This runs the
    private ``_init_optimizer_states_with_dummy_values`` (one zero-gradient step; the
    values are overwritten by the load) on each sub-optimizer without state.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not any(sub.optimizer.state.values()):
            sub._init_optimizer_states_with_dummy_values()


# ---- W-dcp-log: torch.distributed.checkpoint logs on the root logger ------------------

@contextlib.contextmanager
def quiet_root_logger(level: int = logging.ERROR):
    """Raise the root logger's level for the duration (checkpoint loading).

    torch 2.13's ``torch.distributed.checkpoint.state_dict_loader`` logs its metadata-read
    fallbacks with tracebacks (``exc_info=True``) on the *root* logger
    (``logger = logging.getLogger()``), so they cannot be silenced by name; a failed load
    becomes one clear :class:`SfmError` line instead.
    """
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)
