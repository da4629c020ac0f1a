"""Causal flash attention with GPT-NeoX partial rotary embedding applied inside the kernel.

:func:`rotary_flash_attention` takes q, k, v in Megatron's ``[s, b, h, d]`` layout (any
strides with a unit stride along ``d``; the layout is never copied), rotates the first
``rotary_dim`` channels of q and k while loading them (GPT-NeoX ``rotate_half``, not
interleaved), and returns softmax(q k^T * scale) v as a new contiguous ``[s, b, h, d]``
tensor. Forward and backward are Triton kernels with fp32 accumulation; the backward
recomputes the attention matrix from the saved log-sum-exp.

:func:`attention_reference` is the same computation in plain PyTorch (any dtype, CPU).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from megatron_sfm.kernels._runtime import (
    KernelUnavailableError,
    interpreter_enabled,
    load_kernel_module,
    next_power_of_2,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0, dtype=torch.float64) -> torch.Tensor:
    """GPT-NeoX inverse frequencies 1 / base^(2i / rotary_dim), i < rotary_dim / 2."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim))


@functools.lru_cache(maxsize=16)
def _cached_tables(device: str, rotary_dim: int, base: float, n_positions: int):
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * rotary_inv_freq(rotary_dim, base)[None, :]
    # Computed in float64 and rounded once: exact to fp32 precision even at 16k positions.
    return (torch.cos(angles).to(device=device, dtype=torch.float32).contiguous(),
            torch.sin(angles).to(device=device, dtype=torch.float32).contiguous())


def rotary_tables(rotary_dim: int, base: float, n_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, fp32 ``[n_positions, rotary_dim // 2]`` (cached)."""
    bucket = max(1024, next_power_of_2(n_positions))  # few distinct cache entries
    cos, sin = _cached_tables(str(torch.device(device)), int(rotary_dim), float(base), bucket)
    return cos, sin


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary on the first ``2 * cos.shape[-1]`` channels of ``x [s, b, h, d]``.

    ``cos``/``sin`` are ``[s, rotary_dim // 2]``; the math runs in ``x``'s dtype.
    """
    half = cos.shape[-1]
    if half == 0:
        return x
    c = torch.cat([cos, cos], dim=-1)[:, None, None, :].to(x.dtype)
    s = torch.cat([sin, sin], dim=-1)[:, None, None, :].to(x.dtype)
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([rot * c + rotated * s, rest], dim=-1)


def attention_reference(q, k, v, *, rotary_dim: int, rotary_base: float = 10000.0, position_offset: int = 0,
                        softmax_scale: Optional[float] = None, causal: bool = True,
                        rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                        return_lse: bool = False):
    """Plain-PyTorch version of :func:`rotary_flash_attention` (rotary, then softmax attention).

    Runs in the inputs' dtype (pass float64 tensors for a high-precision reference). The
    rotary tables are computed in float64 unless given.
    """
    s, _, _, d = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cos, sin = _tables_for(rotary_dim, rotary_base, position_offset, s, q.device, rotary_cos, rotary_sin,
                           dtype=torch.float64)
    cos, sin = cos[position_offset:position_offset + s], sin[position_offset:position_offset + s]
    qr = apply_rotary_reference(q, cos.to(q.dtype), sin.to(q.dtype))
    kr = apply_rotary_reference(k, cos.to(k.dtype), sin.to(k.dtype))
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (qr, kr, v))  # [b, h, s, d]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh).permute(2, 0, 1, 3)
    return (out, lse) if return_lse else out


def _tables_for(rotary_dim, rotary_base, position_offset, seq_len, device, rotary_cos, rotary_sin,
                dtype=torch.float32):
    half = rotary_dim // 2
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_flash_attention: give both rotary_cos and rotary_sin, or neither")
        if rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2 or rotary_cos.shape[1] != half:
            raise ValueError(f"rotary_flash_attention: rotary_cos/rotary_sin must be [positions, {half}], "
                             f"got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if rotary_cos.shape[0] < position_offset + seq_len:
            raise ValueError(f"rotary_flash_attention: rotary tables cover {rotary_cos.shape[0]} positions, "
                             f"need position_offset + seq_len = {position_offset + seq_len}")
        cos, sin = rotary_cos, rotary_sin
        return cos.to(dtype), sin.to(dtype)
    if dtype == torch.float64:
        angles = (torch.arange(position_offset + seq_len, dtype=torch.float64)[:, None]
                  * rotary_inv_freq(rotary_dim, rotary_base)[None, :]).to(device)
        return torch.cos(angles), torch.sin(angles)
    cos, sin = rotary_tables(rotary_dim, rotary_base, position_offset + seq_len, device)
    return cos, sin


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (tests replace this to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(q, k, v, rotary_dim, position_offset):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"rotary_flash_attention: q, k, v must all be [s, b, h, d] with the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (grouped-query attention is not "
                         "supported)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rotary_flash_attention: q, k, v must share one of fp32/fp16/bf16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"rotary_flash_attention: head dim {d} > {MAX_HEAD_DIM} is not supported")
    if rotary_dim < 0 or rotary_dim > d or rotary_dim % 2:
        raise ValueError(f"rotary_flash_attention: rotary_dim must be even and in [0, {d}], got {rotary_dim}")
    if position_offset < 0:
        raise ValueError(f"rotary_flash_attention: position_offset must be >= 0, got {position_offset}")
    if not (q.device == k.device == v.device):
        raise ValueError("rotary_flash_attention: q, k, v must be on one device")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Only the channel stride must be 1; any s/b/h strides (views of a fused qkv) are used as is.
    return t if t.stride(-1) == 1 else t.contiguous()


class _Geometry:
    """Compile-time column chunks for a head dim and rotary dim (see ``_attention_kernels``)."""

    def __init__(self, head_dim: int, rotary_dim: int):
        self.head_dim = head_dim
        self.rot_half = rotary_dim // 2
        self.hp = max(16, next_power_of_2(self.rot_half)) if self.rot_half else 0
        rest = head_dim - rotary_dim
        self.pa = self.pb = 0
        if rest > 0:
            single = max(16, next_power_of_2(rest))
            first = max(16, 1 << (rest.bit_length() - 1))  # largest power of two <= rest
            second = 0 if rest <= first else max(16, next_power_of_2(rest - first))
            if single <= first + second:  # one chunk pads no more than two
                self.pa = single
            else:
                self.pa, self.pb = first, second
        self.dv = max(16, next_power_of_2(head_dim))

    def constexprs(self, causal: bool, dtype: torch.dtype, interpret: bool) -> dict:
        return dict(HEAD_DIM=self.head_dim, ROT_HALF=self.rot_half, HP=self.hp, PA=self.pa, PB=self.pb,
                    DV=self.dv, CAUSAL=causal, UPCAST=interpret, IEEE=interpret or dtype == torch.float32)


# Block sizes under the interpreter (tests may override through ``block_sizes``): small, so
# that short sequences span several blocks and the masked/unmasked split is exercised.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}
# Fixed GPU blocks instead of autotuning when set (the GPU run of the tests uses this to
# compile one configuration per shape); None: autotune.
FIXED_BLOCKS: Optional[dict] = None
# The one configuration per shape the GPU run of tests/kernels pins (instead of autotuning
# every test shape). dq at 64x64 needs 304 KiB of shared memory for fp32 at head dim 256,
# more than an H100 block has (227 KiB); 64x32 fits (benchmarks/triton_compile_check.py).
GPU_TEST_BLOCKS = {"fwd": (64, 64), "dkdv": (32, 64), "dq": (64, 32)}


def _launch(kmod, name, grid_fn, args, consts, block_sizes):
    kernel = {"fwd": kmod.fwd, "dkdv": kmod.bwd_dkdv, "dq": kmod.bwd_dq}[name]
    tuned = {"fwd": kmod.fwd_tuned, "dkdv": kmod.dkdv_tuned, "dq": kmod.dq_tuned}[name]
    blocks = block_sizes or (INTERPRETER_BLOCKS if kmod.INTERPRETED else FIXED_BLOCKS)
    if blocks is not None or tuned is None:
        bm, bn = (blocks or INTERPRETER_BLOCKS)[name]
        extra = {} if kmod.INTERPRETED else {"num_warps": 4, "num_stages": 2}
        kernel[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, **extra)
    else:
        tuned[grid_fn](*args, **consts)


def _forward(q, k, v, cos, sin, geo: _Geometry, causal, scale, position_offset, block_sizes=None):
    kmod = load_kernel_module("_attention_kernels", "rotary_flash_attention", q, k, v)
    s, b, h, d = q.shape
    out = _new_output((s, b, h, d), q.dtype, q.device)
    lse = _new_output((b, h, s), torch.float32, q.device)
    consts = geo.constexprs(causal, q.dtype, kmod.INTERPRETED)
    args = (q, k, v, out, lse, cos, sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, s, position_offset, scale * kmod.LOG2E)
    _launch(kmod, "fwd", lambda meta: (triton_cdiv(s, meta["BLOCK_M"]), b * h), args, consts, block_sizes)
    return out, lse


def _backward(do, q, k, v, out, lse, cos, sin, geo: _Geometry, causal, scale, position_offset, block_sizes=None):
    kmod = load_kernel_module("_attention_kernels", "rotary_flash_attention (backward)", do, q)
    do = _unit_last_stride(do)
    s, b, h, d = q.shape
    delta = _new_output((b, h, s), torch.float32, q.device)
    block = 16 if kmod.INTERPRETED else 64
    kmod.bwd_delta[(triton_cdiv(s, block), b * h)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, s, HEAD_DIM=d, DV=geo.dv, BLOCK_M=block)
    dq, dk, dv = (_new_output((s, b, h, d), q.dtype, q.device) for _ in range(3))
    consts = geo.constexprs(causal, q.dtype, kmod.INTERPRETED)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, cos, sin, *common,
                 dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                 h, s, position_offset, scale, scale * kmod.LOG2E)
    _launch(kmod, "dkdv", lambda meta: (triton_cdiv(s, meta["BLOCK_N"]), b * h), dkdv_args, consts, block_sizes)
    dq_args = (q, k, v, do, lse, delta, dq, cos, sin, *common, dq.stride(0), dq.stride(1), dq.stride(2),
               h, s, position_offset, scale, scale * kmod.LOG2E)
    _launch(kmod, "dq", lambda meta: (triton_cdiv(s, meta["BLOCK_M"]), b * h), dq_args, consts, block_sizes)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _RotaryFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, rotary_dim, causal, scale, position_offset, block_sizes):
        geo = _Geometry(q.shape[-1], rotary_dim)
        out, lse = _forward(q, k, v, cos, sin, geo, causal, scale, position_offset, block_sizes)
        ctx.save_for_backward(q, k, v, out, lse, cos, sin)
        ctx.geo, ctx.causal, ctx.scale, ctx.position_offset = geo, causal, scale, position_offset
        ctx.block_sizes = block_sizes
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cos, sin = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, cos, sin, ctx.geo, ctx.causal, ctx.scale,
                               ctx.position_offset, ctx.block_sizes)
        return dq, dk, dv, None, None, None, None, None, None, None


def rotary_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary_dim: int,
                           rotary_base: float = 10000.0, position_offset: int = 0,
                           softmax_scale: Optional[float] = None, causal: bool = True,
                           rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                           return_lse: bool = False, block_sizes: Optional[dict] = None):
    """Fused GPT-NeoX rotary + causal softmax attention (Triton), differentiable.

    Args:
        q, k, v: ``[s, b, h, d]`` fp32/fp16/bf16 on a CUDA device (or CPU with
            ``TRITON_INTERPRET=1``); any strides with ``stride(-1) == 1``. ``d <= 256``.
        rotary_dim: channels of q and k rotated (even, ``<= d``; Pythia: ``d * 0.25``);
            0 disables the rotary embedding.
        rotary_base: base of the inverse frequencies ``base^(-2i/rotary_dim)``.
        position_offset: position of row 0 (the rotary angle uses ``offset + row``).
        softmax_scale: defaults to ``1 / sqrt(d)``.
        causal: mask keys after the query (self-attention, equal lengths).
        rotary_cos, rotary_sin: optional fp32 tables ``[positions, rotary_dim // 2]``
            indexed by absolute position; when given they replace ``rotary_base`` (the
            Megatron glue passes Megatron's own angles).
        return_lse: also return the natural-log log-sum-exp ``[b, h, s]`` (fp32).
        block_sizes: testing hook, ``{"fwd"|"dkdv"|"dq": (BLOCK_M, BLOCK_N)}`` instead of autotuning.

    Returns:
        out ``[s, b, h, d]`` (contiguous, input dtype), and ``lse`` if ``return_lse``.

    Raises:
        KernelUnavailableError: no CUDA device and ``TRITON_INTERPRET`` not set.
    """
    _check_inputs(q, k, v, rotary_dim, position_offset)
    s, d = q.shape[0], q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    if rotary_dim:
        cos, sin = _tables_for(rotary_dim, rotary_base, position_offset, s, q.device, rotary_cos, rotary_sin)
        cos = cos.to(device=q.device, dtype=torch.float32).contiguous()
        sin = sin.to(device=q.device, dtype=torch.float32).contiguous()
    else:
        cos = sin = torch.zeros((1, 1), dtype=torch.float32, device=q.device)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    out, lse = _RotaryFlashAttention.apply(q, k, v, cos, sin, int(rotary_dim), bool(causal), scale,
                                           int(position_offset), block_sizes)
    return (out, lse) if return_lse else out


__all__ = [
    "KernelUnavailableError",
    "apply_rotary_reference",
    "attention_reference",
    "interpreter_enabled",
    "rotary_flash_attention",
    "rotary_inv_freq",
    "rotary_tables",
]
