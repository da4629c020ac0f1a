"""One training step (forward, backward, optimizer) over one global batch, and evaluation.

``train_step(state, data_iterators)`` runs Megatron-Core's pipeline schedule
(``get_forward_backward_func``) over ``num_microbatches`` micro-batches, reduces the
loss and per-source losses over data parallelism, checks loss and gradient norm for
non-finite values (skip: no update, counted), clips and steps the optimizer and the LR
scheduler. It returns a :class:`StepResult`; ``step_time_s`` is the wall time of the
step (CUDA-synchronised), so a benchmark can call it in a loop.

Loss (``megatron_sfm.training.loss``): the per-token cross-entropy (Megatron's, or the
fused Triton kernel at TP=1, per ``training.cross_entropy``), times the loss weight of
the token's source, summed over unmasked tokens; each micro-batch contributes
sum/tokens/num_microbatches to the gradient (Megatron's default,
``calculate_per_token_loss=False``). The *reported* loss is the unweighted token mean
over the whole global batch; per-source losses (by the sample's blend ``dataset_id``)
are unweighted too; ``weighted_loss`` is the mean the gradient was taken of.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from megatron_sfm.training.state import TrainingState


@dataclass
class StepResult:
    iteration: int  # iteration number after this step (1-based count of steps)
    loss: float  # token-weighted mean LM loss of the global batch (nan when non-finite)
    grad_norm: float  # before clipping (nan/inf when non-finite)
    lr: float  # learning rate used for this step
    skipped: bool  # update skipped (non-finite loss or grad norm)
    tokens: int  # tokens in the global batch (samples x seq_length)
    loss_tokens: int  # tokens that counted in the loss
    step_time_s: float
    source_loss: dict = field(default_factory=dict)  # name -> mean loss (sources with tokens only)
    source_tokens: dict = field(default_factory=dict)  # name -> loss tokens
    weighted_loss: float = float("nan")  # sum(w_src * token loss) / tokens: what was backpropagated


def _device() -> torch.device:
    from megatron_sfm.compat import device

    return device()


@dataclass(frozen=True)
class LossSetup:
    """What :func:`forward_step` needs besides the batch (built by :func:`loss_setup`)."""

    num_sources: int
    fused: bool  # fused Triton cross-entropy over [s, b, V] logits (else Megatron's per-token loss)
    half_precision_module: bool  # model wrapped in Float16Module: keep its logits in bf16/fp16 for the kernel
    default_weights: Optional[tuple] = None  # per-source loss weights for batches without "source_weights"


def loss_setup(state: TrainingState) -> LossSetup:
    weights = state.default_loss_weights
    return LossSetup(num_sources=state.num_sources, fused=state.cross_entropy == "fused",
                     half_precision_module=state.cfg.model.precision in ("bf16", "fp16"),
                     default_weights=tuple(weights) if weights is not None else None)


def forward_step(setup: LossSetup, data_iterator, model):
    """Megatron ``forward_step_func``: read one micro-batch, run the model, return its loss fn."""
    from megatron_sfm.training.loss import fused_loss, megatron_loss

    batch = next(data_iterator)
    dev = _device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    source_ids = batch["source_ids"].to(dev, non_blocking=True)
    weights = batch.get("source_weights")
    if weights is None and setup.default_weights is not None:
        weights = torch.tensor(setup.default_weights, dtype=torch.float32)
    if weights is not None:
        weights = weights.to(dev, non_blocking=True)
    if setup.fused:
        # the model returns [s, b, V] logits (compat.install_logits_output); the kernel reads bf16 as is
        kwargs = {"fp32_output": False} if setup.half_precision_module else {}
        output = model(tokens, position_ids, None, labels=labels, **kwargs)
        return output, partial(fused_loss, labels, loss_mask, source_ids, setup.num_sources, weights)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(megatron_loss, loss_mask, source_ids, setup.num_sources, weights)


def loss_func(loss_mask: torch.Tensor, source_ids: torch.Tensor, num_sources: int, output_tensor: torch.Tensor,
              source_weights: Optional[torch.Tensor] = None):
    """Per-token losses [b, s] -> (weighted loss sum, token count, report) as Megatron's schedules expect.

    The schedule divides the returned loss in place (by tokens and micro-batches), so the
    report holds a copy: [loss_sum, tokens, per-source sums (S), per-source tokens (S),
    weighted loss sum] (see :mod:`megatron_sfm.training.loss`).
    """
    from megatron_sfm.training.loss import megatron_loss

    return megatron_loss(loss_mask, source_ids, num_sources, source_weights, output_tensor)


def _reduce_report(state: TrainingState, losses_reduced: list) -> torch.Tensor:
    """Sum the micro-batch reports, over data parallelism, and share them with every stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sfm.training.loss import report_size

    total = torch.zeros(report_size(state.num_sources), dtype=torch.float64, device=_device())
    for item in losses_reduced or []:
        if isinstance(item, dict) and "report" in item:
            total += item["report"]
    if state.dp_size > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # only the last stage has losses; the others contribute zeros
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def _summarise(state: TrainingState, report: torch.Tensor) -> tuple[float, int, dict, dict, float]:
    s = state.num_sources
    r = report.cpu().tolist()
    tokens = int(round(r[1]))
    loss = r[0] / tokens if tokens > 0 else float("nan")
    weighted = r[-1] / tokens if tokens > 0 else float("nan")
    src_loss, src_tokens = {}, {}
    for i, name in enumerate(state.source_names):
        n = int(round(r[2 + s + i]))
        if n > 0:
            src_loss[name] = r[2 + i] / n
            src_tokens[name] = n
    return loss, tokens, src_loss, src_tokens, weighted


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_backward(state: TrainingState, iterators: list, *, forward_only: bool = False) -> torch.Tensor:
    """Run the pipeline schedule over one global batch; return the reduced loss report.

    With ``forward_only=False`` the gradients are left in the DDP grad buffers
    (``param.main_grad``, reduced over data parallelism); nothing is stepped.
    """
    t = state.cfg.training
    losses_reduced = state.forward_backward_func(
        forward_step_func=partial(forward_step, loss_setup(state)),
        data_iterator=iterators if len(state.model) > 1 else iterators[0],
        model=state.model if len(state.model) > 1 else state.model[0],
        num_microbatches=state.num_microbatches, seq_length=state.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=forward_only)
    return _reduce_report(state, losses_reduced)


def train_step(state: TrainingState, data_iterators: Optional[list] = None) -> StepResult:
    """One optimizer step over one global batch; advances ``state`` (iteration, samples)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    iterators = data_iterators if data_iterators is not None else state.train_iterators
    if iterators is None:
        raise RuntimeError("train_step: no data iterators (build_training_state(with_data=False)?)")
    _sync()
    start = time.perf_counter()
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    report = forward_backward(state, iterators)
    iteration = state.iteration + 1
    loss, loss_tokens, src_loss, src_tokens, weighted_loss = _summarise(state, report)

    optimizer = state.optimizer
    found_inf = bool(optimizer.prepare_grads())
    grad_norm = float(optimizer.get_grad_norm()) if not found_inf else float("inf")
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else 0.0
    skipped = found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm)
    if not skipped:
        clip = state.cfg.optimizer.clip_grad
        if clip > 0:
            for sub in _sub_optimizers(optimizer):
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=clip, total_norm=grad_norm,
                        use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        optimizer.step_with_ready_grads()
        state.scheduler.step(increment=1)
        state.consecutive_nonfinite = 0
    else:
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
    _sync()
    elapsed = time.perf_counter() - start
    state.iteration = iteration
    state.consumed_train_samples += state.global_batch_size
    return StepResult(iteration=iteration, loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped,
                      tokens=state.tokens_per_step, loss_tokens=loss_tokens, step_time_s=elapsed,
                      source_loss=src_loss, source_tokens=src_tokens, weighted_loss=weighted_loss)


@dataclass
class EvalResult:
    loss: float
    source_loss: dict
    source_tokens: dict
    batches: int


@torch.no_grad()
def evaluate(state: TrainingState, iterators: list, num_batches: int) -> EvalResult:
    """Forward-only over ``num_batches`` global batches of the validation split."""
    for chunk in state.model:
        chunk.eval()
    from megatron_sfm.training.loss import report_size

    total = torch.zeros(report_size(state.num_sources), dtype=torch.float64, device=_device())
    try:
        for _ in range(num_batches):
            total += forward_backward(state, iterators, forward_only=True)
            state.consumed_valid_samples += state.global_batch_size
    finally:
        for chunk in state.model:
            chunk.train()
    loss, _, src_loss, src_tokens, _ = _summarise(state, total)
    return EvalResult(loss=loss, source_loss=src_loss, source_tokens=src_tokens, batches=num_batches)
