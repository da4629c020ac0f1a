"""Everything a training step needs, built from one :class:`RunConfig`.

``build_training_state(cfg)`` initialises torch.distributed and Megatron-Core's parallel
state, builds the model chunks (Megatron ``DistributedDataParallel``, bf16 model with
``Float16Module`` and fp32 main params in the optimizer), the Megatron optimizer
(distributed or not), the LR/WD scheduler and the data iterators. The benchmark and
the trainer loop both start here, and end with ``release_training_state(state)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_sfm.config import RunConfig, validate_run_config
from megatron_sfm.errors import SfmError

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    cfg: RunConfig
    model: list  # DDP-wrapped model chunks (one, or one per virtual pipeline stage)
    optimizer: Any
    scheduler: Any
    forward_backward_func: Any
    num_microbatches: int
    seq_length: int
    world_size: int
    dp_rank: int
    dp_size: int
    source_names: list[str] = field(default_factory=lambda: ["all"])
    data: Any = None  # megatron_sfm.training.data.DataSources
    train_iterators: Optional[list] = None  # one MicroBatchIterator per model chunk
    iteration: int = 0  # optimizer steps done (skipped ones included)
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    # called with (iteration index, [global sample indices], tokens) for each training
    # micro-batch of the first chunk; set it, then reset_train_iterators (a callback's on_init)
    sample_recorder: Any = None
    cross_entropy: str = "megatron"  # the loss implementation in use: "fused" or "megatron" (see loss.py)
    default_loss_weights: Optional[list] = None  # per-source loss weights for batches without their own
    extra: dict = field(default_factory=dict)

    @property
    def num_sources(self) -> int:
        return len(self.source_names)

    @property
    def global_batch_size(self) -> int:
        return self.cfg.training.global_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def unwrapped(self) -> list:
        """The bare GPTModel of each chunk (inside DDP and Float16Module)."""
        out = []
        for chunk in self.model:
            m = chunk.module if hasattr(chunk, "module") else chunk
            from megatron.core.transformer.module import Float16Module

            if isinstance(m, Float16Module):
                m = m.module
            out.append(m)
        return out


def _warmup_iters(cfg: RunConfig) -> int:
    o, t = cfg.optimizer, cfg.training
    if o.warmup_iters is not None:
        return o.warmup_iters
    return int(round(o.warmup_fraction * t.train_iters))


def build_scheduler(cfg: RunConfig, optimizer):
    """Megatron's OptimizerParamScheduler in iterations: linear warmup then cosine to min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, t = cfg.optimizer, cfg.training
    warmup = _warmup_iters(cfg)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(t.train_iters, warmup + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def build_model_chunks(cfg: RunConfig, *, wrap_ddp: bool = True):
    """Model chunks for this rank (list), each wrapped in Float16Module (bf16/fp16) and DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_sfm.model.builder import build_gpt_model, transformer_config

    overrides = {}
    if cfg.training.recompute_activations:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = transformer_config(cfg.model, cfg.parallel, **overrides)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    rng_before = torch.get_rng_state()
    chunks = []
    for vp_stage in range(vpp or 1):
        chunks.append(build_gpt_model(cfg.model, cfg.parallel, vp_stage=vp_stage if vpp else None, config=config))
    if config.use_cpu_initialization and cfg.parallel.pipeline_model_parallel_size > 1:
        _copy_single_stage_init(cfg, chunks, rng_before)
    if cfg.model.precision in ("bf16", "fp16"):
        chunks = [Float16Module(config, c) for c in chunks]
    if not wrap_ddp:
        return chunks, config
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=p.grad_reduce_in_fp32, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather, use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None if p.overlap_grad_reduce else None)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                       disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    for w in wrapped:
        w.broadcast_params()
    return wrapped, config


def _copy_single_stage_init(cfg: RunConfig, chunks: list, rng_before: torch.Tensor) -> None:
    """CPU initialisation: give each pipeline stage the weights a PP=1 model would have.

    Megatron draws every stage's initial weights from the same seeded CPU RNG, so with
    PP>1 stage 2's first layer gets the numbers stage 1's embedding got: the run starts
    from other weights than PP=1 (also in Megatron-LM). On the CPU (tests, tiny models)
    we build the whole model once (same TP slice) from the same RNG state and copy this
    stage's layers, so every layout starts from identical weights. GPUs initialise on
    the device and keep Megatron's behaviour.
    """
    import dataclasses

    from megatron_sfm.model.builder import build_gpt_model, transformer_config

    single = dataclasses.replace(cfg.parallel, pipeline_model_parallel_size=1,
                                 virtual_pipeline_model_parallel_size=None)
    after = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    full_config = transformer_config(cfg.model, single)
    full = build_gpt_model(cfg.model, single, pre_process=True, post_process=True, config=full_config)
    torch.set_rng_state(after)
    with torch.no_grad():
        for chunk in chunks:
            if chunk.pre_process:
                chunk.embedding.load_state_dict(full.embedding.state_dict())
            for layer in chunk.decoder.layers:
                layer.load_state_dict(full.decoder.layers[layer.layer_number - 1].state_dict())
            if chunk.decoder.final_layernorm is not None:
                chunk.decoder.final_layernorm.load_state_dict(full.decoder.final_layernorm.state_dict())
            if chunk.post_process:
                chunk.output_layer.load_state_dict(full.output_layer.state_dict())
    del full


def build_optimizer(cfg: RunConfig, model_chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, m = cfg.optimizer, cfg.model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.precision]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=m.precision == "bf16", fp16=m.precision == "fp16", params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        loss_scale=None if m.precision != "fp16" else None)
    return get_megatron_optimizer(opt_config, model_chunks)


def _wire_model_config(config, model_chunks, optimizer, cfg: RunConfig) -> None:
    """The hooks the pipeline schedules call (as Megatron-LM's training loop sets them)."""
    from megatron.core.distributed import finalize_model_grads

    config.grad_scale_func = optimizer.scale_loss
    config.timers = None
    if cfg.parallel.overlap_grad_reduce:
        funcs = [c.no_sync for c in model_chunks]
        config.no_sync_func = funcs[0] if len(funcs) == 1 else funcs
        grad = [c.start_grad_sync for c in model_chunks]
        config.grad_sync_func = grad[0] if len(grad) == 1 else grad
    if cfg.parallel.overlap_param_gather:
        params = [c.start_param_sync for c in model_chunks]
        config.param_sync_func = params[0] if len(params) == 1 else params
    config.finalize_model_grads_func = finalize_model_grads


def build_training_state(cfg: RunConfig, *, with_data: bool = True, stop_check=None) -> TrainingState:
    """Initialise parallel state, model, optimizer, scheduler and (optionally) data.

    Call under torchrun/srun (or in a single process: world size 1). ``with_data=False``
    skips the datasets (the caller then passes its own micro-batch iterator to
    :func:`megatron_sfm.training.step.train_step`). ``stop_check`` (optional, called on
    every rank right after the parallel state is up) returning True raises
    :class:`megatron_sfm.training.signals.StartupInterrupted` before the model is built.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sfm.model.parallel import initialize_parallel
    from megatron_sfm.compat import apply_all

    apply_all()
    initialize_parallel(cfg.parallel, cfg.training.seed)
    if stop_check is not None and stop_check():
        from megatron_sfm.training.signals import StartupInterrupted

        raise StartupInterrupted()
    world = dist.get_world_size()
    validate_run_config(cfg, world)
    from megatron_sfm.compat import device
    from megatron_sfm.training.loss import resolve_cross_entropy

    cross_entropy = resolve_cross_entropy(cfg.training.cross_entropy, cfg.parallel.tensor_model_parallel_size,
                                          device())
    if with_data:
        from megatron_sfm.training.data import check_data

        check_data(cfg)  # bad data fails before the model is built (rank 0 scans, every rank raises)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    model, config = build_model_chunks(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    _wire_model_config(config, model, optimizer, cfg)
    t = cfg.training
    state = TrainingState(
        cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
        forward_backward_func=get_forward_backward_func(),
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp_size),
        seq_length=cfg.model.seq_length, world_size=world, dp_rank=dp_rank, dp_size=dp_size)
    state.extra["model_config"] = config
    set_cross_entropy(state, cross_entropy)
    if with_data:
        from megatron_sfm.training.data import build_data, data_fingerprint

        state.data = build_data(cfg, checked=True)
        state.extra["data_sha256"] = data_fingerprint(cfg)  # at startup: what this run trains on
        state.source_names = list(state.data.source_names)
        reset_train_iterators(state)
    else:
        from megatron_sfm.training.loss import weight_vector

        state.default_loss_weights = weight_vector(state.source_names, cfg.data.source_loss_weights,
                                                   "data.source_loss_weights")
    return state


# The hooks _wire_model_config sets on the model's TransformerConfig (all default to None).
_CONFIG_HOOKS = ("grad_scale_func", "finalize_model_grads_func", "no_sync_func", "grad_sync_func", "param_sync_func")


def release_training_state(state: TrainingState) -> None:
    """Let the garbage collector free the state's model, gradients and optimizer state.

    Without it, a state with fp32 weights and the distributed optimizer that goes out of
    scope is never freed, even by ``gc.collect()``, and a second state built in the same
    process (benchmark rows, tests, notebooks) sits next to the first one, in GPU memory
    too (Megatron-Core 0.16.1, torch 2.13; ``tests/training/test_release.py``): the model
    config holds ``optimizer.scale_loss``, whose autograd views lead back to DDP, and
    Megatron's rotary ``lru_cache`` keeps the rotary module. This cuts those references
    (:func:`megatron_sfm.compat.release_model_references`, W-release in
    docs/megatron-core-compat.md: the callables ``_wire_model_config`` put on the model
    config, the rotary cache, DDP's gradient-accumulator hooks and forward pre-hooks) and drops the
    model chunks, optimizer, scheduler, data and iterators from ``state``.

    Call it when done with the state (after the last checkpoint save has finished);
    ``state`` keeps its counters (iteration, consumed samples) but cannot train any more.
    Memory comes back at the next ``gc.collect()`` (then ``torch.cuda.empty_cache()`` to
    return it to the driver). Calling it twice is harmless.
    """
    from megatron_sfm.compat import release_model_references

    configs = [state.extra.pop("model_config", None)] + [getattr(chunk, "config", None) for chunk in state.model]
    release_model_references(state.model, configs, _CONFIG_HOOKS)
    state.model = []
    state.optimizer = None
    state.scheduler = None
    state.train_iterators = None
    state.data = None


def set_cross_entropy(state: TrainingState, mode: str) -> None:
    """Switch the loss implementation ("fused" or "megatron") of the state's model chunks."""
    from megatron_sfm.compat import install_logits_output, remove_logits_output

    if mode not in ("fused", "megatron"):
        raise ValueError(f"set_cross_entropy: mode must be 'fused' or 'megatron', got {mode!r}")
    for gpt in state.unwrapped():
        if mode == "fused" and gpt.post_process:
            install_logits_output(gpt)
        else:
            remove_logits_output(gpt)
    state.cross_entropy = mode


def uses_loss_weights(state: TrainingState) -> bool:
    """True when some source's loss weight is not 1 (in any phase, or by default)."""
    phases = getattr(state.data, "train_loss_weights", None) or []
    return state.default_loss_weights is not None or any(w is not None for w in phases)


def reset_train_iterators(state: TrainingState) -> None:
    """(Re)create the per-chunk micro-batch iterators at ``state.consumed_train_samples``."""
    from megatron_sfm.training.data import MicroBatchIterator

    if state.data is None:
        return
    state.train_iterators = [
        MicroBatchIterator(state.data, state.consumed_train_samples, state.cfg.training.micro_batch_size,
                           state.dp_rank, state.dp_size,
                           record=state.sample_recorder if i == 0 else None)
        for i in range(len(state.model))]


def valid_iterators(state: TrainingState) -> Optional[list]:
    from megatron_sfm.training.data import MicroBatchIterator

    if state.data is None or state.data.valid is None:
        return None
    return [MicroBatchIterator(state.data, state.consumed_valid_samples, state.cfg.training.micro_batch_size,
                               state.dp_rank, state.dp_size, split="valid") for _ in state.model]


def check_no_fp8_fallback(cfg: RunConfig) -> Optional[str]:
    """The FP8 backend that will run (None when off); an SfmError when FP8 cannot run."""
    from megatron_sfm.model.builder import check_fp8

    backend = check_fp8(cfg.model)
    if backend == "torchao":
        try:
            import megatron_sfm.model.float8  # noqa: F401
        except ImportError as exc:
            raise SfmError(f"model.fp8.backend: torchao float8 is not usable here: {exc}") from None
    return backend
