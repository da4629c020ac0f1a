"""Triton kernels: causal flash attention with GPT-NeoX partial rotary fused in.

Imported lazily by :mod:`megatron_sfm.kernels.attention` (see ``_runtime``): Triton picks
compiled or interpreted kernels when this module is imported.

Register layout of the q/k tiles (``DQK`` columns). Memory channel ``c`` of a head is
placed so that the two rotary halves sit in two power-of-two column groups and the
rotation partner of a column is the same column in the other group:

    columns [0, HALF_PAD)            channels [0, ROT_HALF)          (rotary half 1)
    columns [HALF_PAD, 2*HALF_PAD)   channels [ROT_HALF, 2*ROT_HALF) (rotary half 2)
    columns [2*HALF_PAD, DQK)        channels [2*ROT_HALF, HEAD_DIM) (pass-through)

Padding columns load as zero, so q.k over the padded tile equals q.k over the head.
This handles rotary dims and head dims that are not powers of two (Pythia-2.8B: head 80,
rotary 20). v, o and do use the plain layout (``DV`` columns).

Rotation (GPT-NeoX ``rotate_half``): x' = x*cos + sign*x[partner]*sin with sign -1 on
half 1 and +1 on half 2; its transpose (for gradients) is the same with -sin.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_sfm.kernels._runtime import autotune_kwargs, interpreter_enabled

INTERPRETED = interpreter_enabled()

LOG2E = 1.4426950408889634


@triton.jit
def _col_maps(DQK: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Per register column: memory channel, validity, rotation partner, its validity, sign, freq index."""
    offs = tl.arange(0, DQK)
    if HALF_PAD > 0:
        in_first = offs < HALF_PAD
        in_rot = offs < 2 * HALF_PAD
        j = offs % HALF_PAD
        mem = tl.where(in_first, j, tl.where(in_rot, ROT_HALF + j, offs - 2 * HALF_PAD + 2 * ROT_HALF))
        rot_ok = in_rot & (j < ROT_HALF)
        valid = tl.where(in_rot, rot_ok, mem < HEAD_DIM)
        partner = tl.where(in_first, ROT_HALF + j, j)
        sign = tl.where(in_first, -1.0, 1.0)
    else:
        j = offs * 0
        mem = offs
        valid = offs < HEAD_DIM
        rot_ok = offs < 0
        partner = offs
        sign = tl.where(offs < 0, -1.0, 1.0)
    return mem, valid, partner, rot_ok, sign, j


@triton.jit
def _rot_tables(Cos, Sin, pos, row_ok, rot_ok, j, ROT_HALF: tl.constexpr):
    """cos/sin tiles [rows, DQK] (cos 1 and sin 0 outside the rotary columns)."""
    m = row_ok[:, None] & rot_ok[None, :]
    idx = pos[:, None].to(tl.int64) * ROT_HALF + j[None, :]
    c = tl.load(Cos + idx, mask=m, other=1.0)
    s = tl.load(Sin + idx, mask=m, other=0.0)
    return c, s


@triton.jit
def _load_rotated(base, rows, stride_s, row_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin, pos_offset,
                  ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """A q or k tile [rows, DQK] in fp32 with the rotary embedding applied."""
    row_off = rows[:, None].to(tl.int64) * stride_s
    x = tl.load(base + row_off + mem[None, :], mask=row_ok[:, None] & valid[None, :], other=0.0).to(tl.float32)
    if HALF_PAD > 0:
        xp = tl.load(base + row_off + partner[None, :], mask=row_ok[:, None] & rot_ok[None, :],
                     other=0.0).to(tl.float32)
        c, s = _rot_tables(Cos, Sin, rows + pos_offset, row_ok, rot_ok, j, ROT_HALF)
        x = x * c + sign[None, :] * xp * s
    return x


@triton.jit
def _swap_halves(x, ROWS: tl.constexpr, DQK: tl.constexpr, HALF_PAD: tl.constexpr):
    """Swap column groups [0, HALF_PAD) and [HALF_PAD, 2*HALF_PAD) of every 2*HALF_PAD block."""
    x4 = tl.reshape(x, (ROWS, DQK // (2 * HALF_PAD), 2, HALF_PAD))
    x4 = tl.permute(x4, (0, 1, 3, 2))
    a, b = tl.split(x4)
    y = tl.join(b, a)
    y = tl.permute(y, (0, 1, 3, 2))
    return tl.reshape(y, (ROWS, DQK))


@triton.jit
def _unrotate(g, Cos, Sin, rows, row_ok, rot_ok, sign, j, pos_offset, ROWS: tl.constexpr, DQK: tl.constexpr,
              ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Gradient through the rotation: g*cos - sign*g[partner]*sin (the transpose)."""
    if HALF_PAD > 0:
        c, s = _rot_tables(Cos, Sin, rows + pos_offset, row_ok, rot_ok, j, ROT_HALF)
        g = g * c - sign[None, :] * _swap_halves(g, ROWS, DQK, HALF_PAD) * s
    return g


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round to the input dtype (what the tensor cores see); fp32 again under the interpreter."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len, pos_offset, lo, hi,
               sm_scale_log2, mem, valid, partner, rot_ok, sign, j, offs_dv, dv_ok, Cos, Sin,
               DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k = _load_rotated(k_base, offs_n, stride_ks, n_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin,
                          pos_offset, ROT_HALF, HALF_PAD)
        k = _operand(k, DTYPE, UPCAST)
        qk = _dot(q, tl.trans(k), IEEE) * sm_scale_log2
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(_operand(p, DTYPE, UPCAST), _operand(v, DTYPE, UPCAST), IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Cos, Sin,
              stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
              stride_vs, stride_vb, stride_vh, stride_os, stride_ob, stride_oh,
              n_heads, seq_len, pos_offset, sm_scale_log2,
              HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, DQK: tl.constexpr,
              DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    DTYPE: tl.constexpr = Q.dtype.element_ty
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seq_len
    mem, valid, partner, rot_ok, sign, j = _col_maps(DQK, HEAD_DIM, ROT_HALF, HALF_PAD)
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    q = _load_rotated(q_base, offs_m, stride_qs, m_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin,
                      pos_offset, ROT_HALF, HALF_PAD)
    q = _operand(q, DTYPE, UPCAST)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)

    # Key blocks entirely below the diagonal and inside the sequence need no mask.
    if CAUSAL:
        full_end = tl.minimum((start_m + 1) // BLOCK_N, seq_len // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len,
                               pos_offset, 0, full_end, sm_scale_log2, mem, valid, partner, rot_ok, sign, j,
                               offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_N, ROT_HALF, HALF_PAD, CAUSAL, False,
                               UPCAST, IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len,
                               pos_offset, full_end, hi, sm_scale_log2, mem, valid, partner, rot_ok, sign, j,
                               offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_N, ROT_HALF, HALF_PAD, CAUSAL, True,
                               UPCAST, IEEE)

    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta(Out, DOut, Delta, stride_os, stride_ob, stride_oh, stride_ds, stride_db, stride_dh,
               n_heads, seq_len, HEAD_DIM: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, s] = sum_d out * dout (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, offs_n, seq_len,
                    pos_offset, lo, hi, sm_scale_log2, mem, valid, partner, rot_ok, sign, j, offs_dv, dv_ok, Cos,
                    Sin, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, ROT_HALF: tl.constexpr,
                    HALF_PAD: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        q = _load_rotated(q_base, offs_m, stride_qs, m_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin,
                          pos_offset, ROT_HALF, HALF_PAD)
        q = _operand(q, DTYPE, UPCAST)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        do = _operand(do, DTYPE, UPCAST)
        # Rows past the end get lse = +inf, hence p = 0.
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        qk_t = _dot(k, tl.trans(q), IEEE)  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(qk_t * sm_scale_log2 - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += _dot(_operand(p_t, DTYPE, UPCAST), do, IEEE)
        dp_t = _dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(_operand(ds_t, DTYPE, UPCAST), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DV_, Cos, Sin,
                   stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                   stride_vs, stride_vb, stride_vh, stride_dos, stride_dob, stride_doh,
                   stride_dks, stride_dkb, stride_dkh, stride_dvs, stride_dvb, stride_dvh,
                   n_heads, seq_len, pos_offset, sm_scale, sm_scale_log2,
                   HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, DQK: tl.constexpr,
                   DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per key block: dk and dv, looping over the query blocks that see it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    DTYPE: tl.constexpr = Q.dtype.element_ty
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DOut + b * stride_dob + h * stride_doh
    lse_base = Lse + pid_bh.to(tl.int64) * seq_len
    delta_base = Delta + pid_bh.to(tl.int64) * seq_len

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_len
    mem, valid, partner, rot_ok, sign, j = _col_maps(DQK, HEAD_DIM, ROT_HALF, HALF_PAD)
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    # Keys past the end load as zero; their dk/dv rows are never stored.
    k = _load_rotated(k_base, offs_n, stride_ks, n_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin, pos_offset,
                      ROT_HALF, HALF_PAD)
    k = _operand(k, DTYPE, UPCAST)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    v = _operand(v, DTYPE, UPCAST)
    dk = tl.zeros((BLOCK_N, DQK), tl.float32)
    dv = tl.zeros((BLOCK_N, DV), tl.float32)

    if CAUSAL:
        # Query blocks overlapping the diagonal need the causal mask; later ones do not.
        diag_lo = (start_n // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, seq_len)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                 offs_n, seq_len, pos_offset, diag_lo, diag_hi, sm_scale_log2, mem, valid, partner,
                                 rot_ok, sign, j, offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_M, ROT_HALF, HALF_PAD,
                                 True, UPCAST, IEEE)
        lo = tl.maximum(diag_hi, diag_lo)
    else:
        lo = 0
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, offs_n,
                             seq_len, pos_offset, lo, seq_len, sm_scale_log2, mem, valid, partner, rot_ok, sign, j,
                             offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_M, ROT_HALF, HALF_PAD, False, UPCAST, IEEE)

    dk = _unrotate(dk * sm_scale, Cos, Sin, offs_n, n_ok, rot_ok, sign, j, pos_offset, BLOCK_N, DQK, ROT_HALF,
                   HALF_PAD)
    rows = offs_n[:, None].to(tl.int64)
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows * stride_dks + mem[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & valid[None, :])
    tl.store(DV_ + b * stride_dvb + h * stride_dvh + rows * stride_dvs + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len, pos_offset, lo,
                  hi, sm_scale_log2, mem, valid, partner, rot_ok, sign, j, offs_dv, dv_ok, Cos, Sin,
                  DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k = _load_rotated(k_base, offs_n, stride_ks, n_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin,
                          pos_offset, ROT_HALF, HALF_PAD)
        k = _operand(k, DTYPE, UPCAST)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        v = _operand(v, DTYPE, UPCAST)
        qk = _dot(q, tl.trans(k), IEEE)
        p = tl.exp2(qk * sm_scale_log2 - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(_operand(ds, DTYPE, UPCAST), k, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, Cos, Sin,
                 stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                 stride_vs, stride_vb, stride_vh, stride_dos, stride_dob, stride_doh,
                 stride_dqs, stride_dqb, stride_dqh,
                 n_heads, seq_len, pos_offset, sm_scale, sm_scale_log2,
                 HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, DQK: tl.constexpr,
                 DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per query block: dq, looping over the key blocks it sees."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    DTYPE: tl.constexpr = Q.dtype.element_ty
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DOut + b * stride_dob + h * stride_doh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seq_len
    mem, valid, partner, rot_ok, sign, j = _col_maps(DQK, HEAD_DIM, ROT_HALF, HALF_PAD)
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    q = _load_rotated(q_base, offs_m, stride_qs, m_ok, mem, valid, partner, rot_ok, sign, j, Cos, Sin, pos_offset,
                      ROT_HALF, HALF_PAD)
    q = _operand(q, DTYPE, UPCAST)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    do = _operand(do, DTYPE, UPCAST)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, DQK), tl.float32)

    if CAUSAL:
        full_end = tl.minimum((start_m + 1) // BLOCK_N, seq_len // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len, pos_offset,
                       0, full_end, sm_scale_log2, mem, valid, partner, rot_ok, sign, j, offs_dv, dv_ok, Cos, Sin,
                       DTYPE, BLOCK_N, ROT_HALF, HALF_PAD, CAUSAL, False, UPCAST, IEEE)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len, pos_offset,
                       full_end, hi, sm_scale_log2, mem, valid, partner, rot_ok, sign, j, offs_dv, dv_ok, Cos, Sin,
                       DTYPE, BLOCK_N, ROT_HALF, HALF_PAD, CAUSAL, True, UPCAST, IEEE)

    dq = _unrotate(dq * sm_scale, Cos, Sin, offs_m, m_ok, rot_ok, sign, j, pos_offset, BLOCK_M, DQK, ROT_HALF,
                   HALF_PAD)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqs + mem[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & valid[None, :])


# ----------------------------------------------------------------------------------------
# launch configurations
# ----------------------------------------------------------------------------------------

_TUNE_KEY = ["seq_len", "HEAD_DIM", "DQK", "CAUSAL"]


def _fwd_configs():
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def _dkdv_configs():
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


def _dq_configs():
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def _prune_for_head_dim(configs, named_args, **kwargs):
    """Large tiles spill registers at head dim 256 (DQK/DV 256): keep the small ones there."""
    width = max(int(named_args.get("DQK", kwargs.get("DQK", 128))), int(named_args.get("DV", kwargs.get("DV", 128))))
    if width <= 128:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return small or configs[-1:]


def _tuned(kernel, configs):
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim},
                           **autotune_kwargs())(kernel)


if INTERPRETED:
    fwd_tuned = dkdv_tuned = dq_tuned = None
else:
    fwd_tuned = _tuned(_attn_fwd, _fwd_configs())
    dkdv_tuned = _tuned(_attn_bwd_dkdv, _dkdv_configs())
    dq_tuned = _tuned(_attn_bwd_dq, _dq_configs())

fwd = _attn_fwd
bwd_dkdv = _attn_bwd_dkdv
bwd_dq = _attn_bwd_dq
bwd_delta = _bwd_delta
