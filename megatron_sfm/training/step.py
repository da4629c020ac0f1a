"""One training step (forward, backward, optimizer) over one global batch, and evaluation.

``train_step(state, data_iterators)`` runs Megatron-Core's pipeline schedule
(``get_forward_backward_func``) over ``num_microbatches`` micro-batches, reduces the
loss and per-source losses over data parallelism, checks loss and gradient norm for
non-finite values (skip: no update, counted), clips and steps the optimizer and the LR
scheduler. It returns a :class:`StepResult`; ``step_time_s`` is the wall time of the
step (CUDA-synchronised), so a benchmark can call it in a loop.

Loss: Megatron's per-token loss is summed over unmasked tokens; each micro-batch
contributes sum/tokens/num_microbatches to the gradient (Megatron's default,
``calculate_per_token_loss=False``); the *reported* loss is the token-weighted mean over
the whole global batch. Per-source losses use the sample's blend ``dataset_id``.
"""

from __future__ import annotations

import math
import os
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


def _faults() -> dict:
    """Test hooks from SFM_FAULTS, e.g. 'nan_loss@3,4;crash_in_save@6' (iterations, 1-based)."""
    spec = os.environ.get("SFM_FAULTS", "")
    out = {}
    for part in filter(None, spec.split(";")):
        name, _, iters = part.partition("@")
        out[name.strip()] = {int(i) for i in iters.split(",") if i.strip()}
    return out


def fault_at(name: str, iteration: int) -> bool:
    return iteration in _faults().get(name, set())


def _device() -> torch.device:
    from megatron_sfm.compat import device

    return device()


def forward_step(num_sources: int, data_iterator, model):
    """Megatron ``forward_step_func``: read one micro-batch, run the model, return its loss fn."""
    batch = next(data_iterator)
    dev = _device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    source_ids = batch["source_ids"].to(dev, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask, source_ids, num_sources)


def loss_func(loss_mask: torch.Tensor, source_ids: torch.Tensor, num_sources: int, output_tensor: torch.Tensor):
    """Per-token losses [b, s] -> (loss sum, token count, report) as Megatron's schedules expect.

    The schedule divides the returned loss in place (by tokens and micro-batches), so the
    report holds a clone: [loss_sum, tokens, per-source sums (S), per-source tokens (S)].
    """
    losses = output_tensor.float()
    mask = loss_mask.float()
    per_sample = (losses * mask).sum(dim=1)
    per_sample_tokens = mask.sum(dim=1)
    loss = per_sample.sum()
    num_tokens = per_sample_tokens.sum().to(torch.int)
    report = torch.zeros(2 + 2 * num_sources, dtype=torch.float64, device=losses.device)
    report[0] = loss.detach().clone().double()
    report[1] = per_sample_tokens.sum().double()
    report[2:2 + num_sources].index_add_(0, source_ids, per_sample.detach().double())
    report[2 + num_sources:].index_add_(0, source_ids, per_sample_tokens.double())
    return loss, num_tokens, {"report": report}


def _reduce_report(state: TrainingState, losses_reduced: list) -> torch.Tensor:
    """Sum the micro-batch reports, over data parallelism, and share them with every stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    n = 2 + 2 * state.num_sources
    total = torch.zeros(n, dtype=torch.float64, device=_device())
    for item in losses_reduced or []:
        if isinstance(item, dict) and "report" in item:
            total += item["report"]
    if state.dp_size > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # only the last stage has losses; the others contribute zeros
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def _summarise(state: TrainingState, report: torch.Tensor) -> tuple[float, int, dict, dict]:
    s = state.num_sources
    r = report.cpu().tolist()
    tokens = int(round(r[1]))
    loss = r[0] / tokens if tokens > 0 else float("nan")
    src_loss, src_tokens = {}, {}
    for i, name in enumerate(state.source_names):
        n = int(round(r[2 + s + i]))
        if n > 0:
            src_loss[name] = r[2 + i] / n
            src_tokens[name] = n
    return loss, tokens, src_loss, src_tokens


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    t = state.cfg.training
    losses_reduced = state.forward_backward_func(
        forward_step_func=partial(forward_step, state.num_sources),
        data_iterator=iterators if len(state.model) > 1 else iterators[0],
        model=state.model if len(state.model) > 1 else state.model[0],
        num_microbatches=state.num_microbatches, seq_length=state.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=False)
    report = _reduce_report(state, losses_reduced)
    iteration = state.iteration + 1
    if fault_at("nan_loss", iteration):
        report[0] = float("nan")
    loss, loss_tokens, src_loss, src_tokens = _summarise(state, report)

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
                      source_loss=src_loss, source_tokens=src_tokens)


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
    t = state.cfg.training
    total = torch.zeros(2 + 2 * state.num_sources, dtype=torch.float64, device=_device())
    try:
        for _ in range(num_batches):
            losses_reduced = state.forward_backward_func(
                forward_step_func=partial(forward_step, state.num_sources),
                data_iterator=iterators if len(state.model) > 1 else iterators[0],
                model=state.model if len(state.model) > 1 else state.model[0],
                num_microbatches=state.num_microbatches, seq_length=state.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True)
            total += _reduce_report(state, losses_reduced)
            state.consumed_valid_samples += state.global_batch_size
    finally:
        for chunk in state.model:
            chunk.train()
    loss, _, src_loss, src_tokens = _summarise(state, total)
    return EvalResult(loss=loss, source_loss=src_loss, source_tokens=src_tokens, batches=num_batches)
