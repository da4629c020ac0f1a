"""Triton kernels: cross-entropy with per-source sums (forward) and its gradient (backward).

Imported lazily by :mod:`megatron_sfm.kernels.cross_entropy` (see ``_runtime``).
One program per token row; the vocabulary is streamed in ``BLOCK_V`` chunks with an
online log-sum-exp (forward) and the gradient is written chunk by chunk (backward), so
each pass reads the logits once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_sfm.kernels._runtime import autotune_kwargs, interpreter_enabled

INTERPRETED = interpreter_enabled()


@triton.jit
def _row_meta(Labels, Src, Weights, row, n_vocab, n_sources, ignore_index, HAS_SRC: tl.constexpr,
              HAS_W: tl.constexpr):
    """label, whether the row counts, its source, whether the label/source are in range, weight."""
    label = tl.load(Labels + row).to(tl.int64)
    counted = label != ignore_index
    label_ok = (label >= 0) & (label < n_vocab)
    if HAS_SRC:
        src = tl.load(Src + row).to(tl.int64)
    else:
        src = tl.zeros((), tl.int64)
    src_ok = (src >= 0) & (src < n_sources)
    if HAS_W:
        w = tl.load(Weights + src, mask=src_ok, other=float("nan")).to(tl.float32)
    else:
        w = tl.where(src_ok, 1.0, float("nan"))
    return label, counted, label_ok, src, src_ok, w


@triton.jit
def _ce_fwd(Logits, stride_row, Labels, Src, Weights, Loss, Lse, SourceSum, SourceCount,
            n_vocab, n_sources, ignore_index,
            HAS_SRC: tl.constexpr, HAS_W: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)  # running max, log2 units
    acc = tl.zeros((), tl.float32)  # running sum of 2^(x - m)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m, tl.max(x, 0))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    lse = (m + tl.log2(acc)) * 0.6931471805599453

    label, counted, label_ok, src, src_ok, w = _row_meta(Labels, Src, Weights, row, n_vocab, n_sources,
                                                         ignore_index, HAS_SRC, HAS_W)
    x_label = tl.load(base + label, mask=counted & label_ok, other=0.0).to(tl.float32)
    # Out-of-range labels or sources give NaN (not a silent wrong value).
    ce = tl.where(label_ok, lse - x_label, float("nan"))
    loss = tl.where(counted, ce * w, 0.0)
    tl.store(Loss + row, loss)
    tl.store(Lse + row, lse)
    add = counted & src_ok
    tl.atomic_add(SourceSum + src, ce, mask=add)
    tl.atomic_add(SourceCount + src, 1, mask=add)


@triton.jit
def _ce_bwd(Logits, stride_row, Grad, stride_grad_row, Labels, Src, Weights, Lse, GradLoss, stride_gl,
            n_vocab, n_sources, ignore_index,
            HAS_SRC: tl.constexpr, HAS_W: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad[row] = (softmax(logits[row]) - onehot(label)) * dloss[row] * weight[source]."""
    row = tl.program_id(0).to(tl.int64)
    label, counted, _label_ok, _src, _src_ok, w = _row_meta(Labels, Src, Weights, row, n_vocab, n_sources,
                                                            ignore_index, HAS_SRC, HAS_W)
    g = tl.load(GradLoss + row * stride_gl).to(tl.float32)
    scale = tl.where(counted, g * w, 0.0)
    lse2 = tl.load(Lse + row) * 1.4426950408889634
    base = Logits + row * stride_row
    gbase = Grad + row * stride_grad_row
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < n_vocab
        x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp2(x * 1.4426950408889634 - lse2)
        grad = (p - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(gbase + cols, grad.to(Grad.dtype.element_ty), mask=inside)


_CONFIGS = [
    triton.Config({"BLOCK_V": 4096}, num_warps=8),
    triton.Config({"BLOCK_V": 8192}, num_warps=16),
    triton.Config({"BLOCK_V": 2048}, num_warps=4),
]

fwd = _ce_fwd
bwd = _ce_bwd
if INTERPRETED:
    fwd_tuned = bwd_tuned = None
else:
    # The forward accumulates into the source sums: reset them before each trial run.
    fwd_tuned = triton.autotune(configs=_CONFIGS, key=["n_vocab", "HAS_SRC", "HAS_W"],
                                reset_to_zero=["SourceSum", "SourceCount"], **autotune_kwargs())(_ce_fwd)
    bwd_tuned = triton.autotune(configs=_CONFIGS, key=["n_vocab", "HAS_SRC", "HAS_W"], **autotune_kwargs())(_ce_bwd)
