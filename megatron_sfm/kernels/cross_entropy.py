"""Fused cross-entropy with per-source loss sums, token counts and optional source weights.

Both functions take the same arguments and return the same three tensors:

* ``per_token_loss`` ``[N]`` fp32: ``weight[source_i] * CE_i`` for counted tokens
  (``labels != ignore_index``) and 0 for ignored ones; ``CE_i = logsumexp(logits_i) -
  logits_i[label_i]``. With ``source_weights=None`` the weight is 1. This is the tensor to
  backpropagate through: the training loss is normally
  ``per_token_loss.sum() / number_of_counted_tokens`` (weights multiply each token's
  term; they are *not* renormalised here).
* ``source_loss_sum`` ``[num_sources]`` fp32: the *unweighted* ``CE_i`` summed over the
  counted tokens of each source, so ``source_loss_sum / source_token_count`` is each
  source's true mean loss whatever the weights. Not differentiable.
* ``source_token_count`` ``[num_sources]`` int64: counted tokens per source.

``source_ids=None`` puts every token in source 0. The gradient with respect to the logits is
``(softmax(logits_i) - onehot(label_i)) * weight[source_i] * dL/dper_token_loss_i``
(0 for ignored tokens), in the logits' dtype.

:func:`fused_cross_entropy` runs Triton kernels: one pass over the logits forward
(online log-sum-exp, per-source sums by atomic adds, so their fp32 summation order is not
deterministic) and one read + one write backward. :func:`cross_entropy_per_source_reference`
is the same in plain torch ops (any device, no Triton). Out-of-range labels or source ids
give NaN losses in the fused version and an indexing error in the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sfm.kernels._runtime import KernelUnavailableError, load_kernel_module


def _check(logits, labels, source_ids, num_sources, source_weights):
    if logits.dim() != 2:
        raise ValueError(f"fused_cross_entropy: logits must be [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"fused_cross_entropy: labels must be [{n}], got {tuple(labels.shape)}")
    if source_ids is not None and source_ids.shape != (n,):
        raise ValueError(f"fused_cross_entropy: source_ids must be [{n}], got {tuple(source_ids.shape)}")
    if num_sources < 1:
        raise ValueError(f"fused_cross_entropy: num_sources must be >= 1, got {num_sources}")
    if source_weights is not None and source_weights.shape != (num_sources,):
        raise ValueError(f"fused_cross_entropy: source_weights must be [{num_sources}], got "
                         f"{tuple(source_weights.shape)}")
    if labels.dtype.is_floating_point or (source_ids is not None and source_ids.dtype.is_floating_point):
        raise ValueError("fused_cross_entropy: labels and source_ids must be integer tensors")


def cross_entropy_per_source_reference(logits: torch.Tensor, labels: torch.Tensor,
                                       source_ids: Optional[torch.Tensor], num_sources: int,
                                       source_weights: Optional[torch.Tensor] = None, ignore_index: int = -100):
    """Plain-torch version of :func:`fused_cross_entropy` (same arguments and results).

    Computes in fp32 (float64 for float64 logits, whose results are then float64).
    Differentiable with respect to ``logits`` through autograd.
    """
    _check(logits, labels, source_ids, num_sources, source_weights)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(dtype)
    ce = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none")
    counted = labels != ignore_index
    src = source_ids.long() if source_ids is not None else torch.zeros_like(labels, dtype=torch.long)
    if src.numel() and (int(src.min()) < 0 or int(src.max()) >= num_sources):
        raise IndexError(f"cross_entropy_per_source_reference: source ids must be in [0, {num_sources}), got "
                         f"[{int(src.min())}, {int(src.max())}]")
    if source_weights is not None:
        w = source_weights.to(device=x.device, dtype=dtype)[src]
        per_token = torch.where(counted, ce * w, torch.zeros_like(ce))
    else:
        per_token = ce
    ce_d = ce.detach()
    sums = torch.zeros(num_sources, dtype=dtype, device=x.device).index_add_(0, src[counted], ce_d[counted])
    counts = torch.bincount(src[counted], minlength=num_sources).to(torch.int64)
    return per_token, sums, counts


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (tests replace this to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, source_ids, num_sources, source_weights, ignore_index, block_v):
        kmod = load_kernel_module("_cross_entropy_kernels", "fused_cross_entropy", logits)
        n, vocab = logits.shape
        device = logits.device
        loss = _new_output((n,), torch.float32, device)
        lse = _new_output((n,), torch.float32, device)
        sums = torch.zeros(num_sources, dtype=torch.float32, device=device)
        counts = torch.zeros(num_sources, dtype=torch.int32, device=device)
        has_src, has_w = source_ids is not None, source_weights is not None
        # Unused pointers still need a tensor; labels stand in.
        src_arg = source_ids if has_src else labels
        w_arg = source_weights if has_w else sums
        if n > 0:
            args = (logits, logits.stride(0), labels, src_arg, w_arg, loss, lse, sums, counts, vocab, num_sources,
                    ignore_index)
            if kmod.fwd_tuned is None or block_v is not None:
                kmod.fwd[(n,)](*args, HAS_SRC=has_src, HAS_W=has_w, BLOCK_V=block_v or 64)
            else:
                kmod.fwd_tuned[(n,)](*args, HAS_SRC=has_src, HAS_W=has_w)
        ctx.save_for_backward(logits, labels, src_arg, w_arg, lse)
        ctx.meta = (has_src, has_w, num_sources, ignore_index, block_v)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts.to(torch.int64)

    @staticmethod
    def backward(ctx, dloss, _dsums, _dcounts):
        logits, labels, src_arg, w_arg, lse = ctx.saved_tensors
        has_src, has_w, num_sources, ignore_index, block_v = ctx.meta
        kmod = load_kernel_module("_cross_entropy_kernels", "fused_cross_entropy (backward)", logits)
        n, vocab = logits.shape
        grad = _new_output((n, vocab), logits.dtype, logits.device)
        if dloss is None or n == 0:
            return grad.zero_(), None, None, None, None, None, None
        dloss = dloss.float()
        args = (logits, logits.stride(0), grad, grad.stride(0), labels, src_arg, w_arg, lse, dloss, dloss.stride(0),
                vocab, num_sources, ignore_index)
        if kmod.bwd_tuned is None or block_v is not None:
            kmod.bwd[(n,)](*args, HAS_SRC=has_src, HAS_W=has_w, BLOCK_V=block_v or 64)
        else:
            kmod.bwd_tuned[(n,)](*args, HAS_SRC=has_src, HAS_W=has_w)
        return grad, None, None, None, None, None, None


def fused_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, source_ids: Optional[torch.Tensor],
                        num_sources: int, source_weights: Optional[torch.Tensor] = None, ignore_index: int = -100,
                        *, block_v: Optional[int] = None):
    """Triton cross-entropy over ``logits [N, V]`` with per-source aggregation (see module doc).

    Args:
        logits: ``[N, V]`` fp32/fp16/bf16, unit stride along ``V`` (any row stride).
        labels: ``[N]`` integer class ids; ``ignore_index`` marks tokens not counted.
        source_ids: ``[N]`` integer source (dataset) ids in ``[0, num_sources)``, or None.
        num_sources: number of sources S.
        source_weights: ``[S]`` float weights multiplying each source's per-token loss, or None.
        block_v: testing hook: fixed vocabulary chunk instead of autotuning.

    Returns:
        ``(per_token_loss [N] fp32, source_loss_sum [S] fp32, source_token_count [S] int64)``.

    Raises:
        KernelUnavailableError: no CUDA device and ``TRITON_INTERPRET`` not set (use
            :func:`cross_entropy_per_source_reference` there).
    """
    _check(logits, labels, source_ids, num_sources, source_weights)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    if source_ids is not None:
        source_ids = source_ids.contiguous()
    if source_weights is not None:
        source_weights = source_weights.to(device=logits.device, dtype=torch.float32).contiguous()
    return _FusedCrossEntropy.apply(logits, labels, source_ids, int(num_sources), source_weights, int(ignore_index),
                                    block_v)


__all__ = ["KernelUnavailableError", "cross_entropy_per_source_reference", "fused_cross_entropy"]
