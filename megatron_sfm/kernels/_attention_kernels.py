"""Triton kernels: causal flash attention with GPT-NeoX partial rotary fused in.

Imported lazily by :mod:`megatron_sfm.kernels.attention` (see ``_runtime``): Triton picks
compiled or interpreted kernels when this module is imported.

Column chunks. A q or k head row (``HEAD_DIM`` channels, the first ``2 * ROT_HALF``
rotated) is held as up to four register tiles, each a power of two wide (>= 16, as
``tl.dot`` needs) and loaded with a plain contiguous masked load:

    x1  channels [0, ROT_HALF)                       width HP  (rotary half 1)
    x2  channels [ROT_HALF, 2*ROT_HALF)              width HP  (rotary half 2)
    xa  channels [2*ROT_HALF, 2*ROT_HALF + PA)       width PA  (pass-through)
    xb  channels [2*ROT_HALF + PA, HEAD_DIM)         width PB  (pass-through rest, 0 = absent)

GPT-NeoX ``rotate_half`` is then elementwise between x1 and x2 (x1' = x1 c - x2 s,
x2' = x2 c + x1 s) with one cos/sin tile of width HP; its transpose for the gradients is
(g1 c + g2 s, g2 c - g1 s). q.k^T is the sum of one ``tl.dot`` per chunk. Padding columns
load as zero. Pythia head 128 / rotary 32 gives chunks 16+16+64+32 (no padding); head 80 /
rotary 20 gives 16+16+64 (12 padding columns). v, o and do use one tile of width DV.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_sfm.kernels._runtime import autotune_kwargs, interpreter_enabled

INTERPRETED = interpreter_enabled()

LOG2E = 1.4426950408889634


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round to the input dtype (what the tensor cores see); fp32 again under the interpreter."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_chunk(base, row_off, row_ok, col0, W: tl.constexpr, limit):
    cols = col0 + tl.arange(0, W)
    return tl.load(base + row_off + cols[None, :], mask=row_ok[:, None] & (cols < limit)[None, :], other=0.0)


@triton.jit
def _store_chunk(base, row_off, row_ok, col0, W: tl.constexpr, limit, val):
    cols = col0 + tl.arange(0, W)
    tl.store(base + row_off + cols[None, :], val, mask=row_ok[:, None] & (cols < limit)[None, :])


@triton.jit
def _rot_table(Cos, Sin, pos, row_ok, ROT_HALF: tl.constexpr, HP: tl.constexpr):
    """cos/sin tiles [rows, HP] for absolute positions ``pos`` (0 in padding columns)."""
    j = tl.arange(0, HP)
    m = row_ok[:, None] & (j < ROT_HALF)[None, :]
    idx = pos[:, None].to(tl.int64) * ROT_HALF + j[None, :]
    return tl.load(Cos + idx, mask=m, other=0.0), tl.load(Sin + idx, mask=m, other=0.0)


@triton.jit
def _load_qk(base, rows, stride_s, row_ok, Cos, Sin, pos_offset, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
             ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, DTYPE: tl.constexpr,
             UPCAST: tl.constexpr):
    """The chunks (x1, x2, xa, xb) of a q or k tile, rotated, as matmul operands."""
    row_off = rows[:, None].to(tl.int64) * stride_s
    x1 = tl.zeros((ROWS, 16), DTYPE)  # placeholders for absent chunks (never used)
    x2 = x1
    xa = x1
    xb = x1
    if HP > 0:
        a = _load_chunk(base, row_off, row_ok, 0, HP, ROT_HALF).to(tl.float32)
        b = _load_chunk(base, row_off, row_ok, ROT_HALF, HP, 2 * ROT_HALF).to(tl.float32)
        c, s = _rot_table(Cos, Sin, rows + pos_offset, row_ok, ROT_HALF, HP)
        x1 = _operand(a * c - b * s, DTYPE, UPCAST)
        x2 = _operand(b * c + a * s, DTYPE, UPCAST)
    if PA > 0:
        xa = _operand(_load_chunk(base, row_off, row_ok, 2 * ROT_HALF, PA, HEAD_DIM), DTYPE, UPCAST)
    if PB > 0:
        xb = _operand(_load_chunk(base, row_off, row_ok, 2 * ROT_HALF + PA, PB, HEAD_DIM), DTYPE, UPCAST)
    return x1, x2, xa, xb


@triton.jit
def _scores(q1, q2, qa, qb, k1, k2, ka, kb, acc, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
            IEEE: tl.constexpr):
    """acc + q @ k^T summed over the chunks, [rows_q, rows_k] fp32."""
    if HP > 0:
        acc = _dot(q1, tl.trans(k1), acc, IEEE)
        acc = _dot(q2, tl.trans(k2), acc, IEEE)
    if PA > 0:
        acc = _dot(qa, tl.trans(ka), acc, IEEE)
    if PB > 0:
        acc = _dot(qb, tl.trans(kb), acc, IEEE)
    return acc


@triton.jit
def _accumulate(g1, g2, ga, gb, ds, x1, x2, xa, xb, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                IEEE: tl.constexpr):
    """Chunk-wise g_c += ds @ x_c (the dq or dk accumulation)."""
    if HP > 0:
        g1 = _dot(ds, x1, g1, IEEE)
        g2 = _dot(ds, x2, g2, IEEE)
    if PA > 0:
        ga = _dot(ds, xa, ga, IEEE)
    if PB > 0:
        gb = _dot(ds, xb, gb, IEEE)
    return g1, g2, ga, gb


@triton.jit
def _store_grad(base, rows, stride_s, row_ok, g1, g2, ga, gb, scale, Cos, Sin, pos_offset, HEAD_DIM: tl.constexpr,
                ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr):
    """Scale, take the gradient back through the rotation, store the chunks of dq or dk."""
    row_off = rows[:, None].to(tl.int64) * stride_s
    out_ty = base.dtype.element_ty
    if HP > 0:
        c, s = _rot_table(Cos, Sin, rows + pos_offset, row_ok, ROT_HALF, HP)
        a = g1 * scale
        b = g2 * scale
        _store_chunk(base, row_off, row_ok, 0, HP, ROT_HALF, (a * c + b * s).to(out_ty))
        _store_chunk(base, row_off, row_ok, ROT_HALF, HP, 2 * ROT_HALF, (b * c - a * s).to(out_ty))
    if PA > 0:
        _store_chunk(base, row_off, row_ok, 2 * ROT_HALF, PA, HEAD_DIM, (ga * scale).to(out_ty))
    if PB > 0:
        _store_chunk(base, row_off, row_ok, 2 * ROT_HALF + PA, PB, HEAD_DIM, (gb * scale).to(out_ty))


@triton.jit
def _grad_accumulators(ROWS: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr):
    g1 = tl.zeros((ROWS, 16), tl.float32)
    g2 = g1
    ga = g1
    gb = g1
    if HP > 0:
        g1 = tl.zeros((ROWS, HP), tl.float32)
        g2 = tl.zeros((ROWS, HP), tl.float32)
    if PA > 0:
        ga = tl.zeros((ROWS, PA), tl.float32)
    if PB > 0:
        gb = tl.zeros((ROWS, PB), tl.float32)
    return g1, g2, ga, gb


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q1, q2, qa, qb, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len, pos_offset,
               lo, hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin,
               DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k1, k2, ka, kb = _load_qk(k_base, offs_n, stride_ks, n_ok, Cos, Sin, pos_offset, BLOCK_N, HEAD_DIM,
                                  ROT_HALF, HP, PA, PB, DTYPE, UPCAST)
        qk = _scores(q1, q2, qa, qb, k1, k2, ka, kb, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), HP, PA, PB, IEEE)
        qk = qk * sm_scale_log2
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
        acc = _dot(_operand(p, DTYPE, UPCAST), _operand(v, DTYPE, UPCAST), acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Cos, Sin,
              stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
              stride_vs, stride_vb, stride_vh, stride_os, stride_ob, stride_oh,
              n_heads, seq_len, pos_offset, sm_scale_log2,
              HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr,
              PB: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
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
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    q1, q2, qa, qb = _load_qk(q_base, offs_m, stride_qs, m_ok, Cos, Sin, pos_offset, BLOCK_M, HEAD_DIM, ROT_HALF,
                              HP, PA, PB, DTYPE, UPCAST)
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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, qa, qb, k_base, v_base, stride_ks, stride_vs, offs_m,
                               seq_len, pos_offset, 0, full_end, sm_scale_log2, offs_dv, dv_ok, Cos, Sin, DTYPE,
                               BLOCK_M, BLOCK_N, HEAD_DIM, ROT_HALF, HP, PA, PB, CAUSAL, False, UPCAST, IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, qa, qb, k_base, v_base, stride_ks, stride_vs, offs_m,
                               seq_len, pos_offset, full_end, hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin, DTYPE,
                               BLOCK_M, BLOCK_N, HEAD_DIM, ROT_HALF, HP, PA, PB, CAUSAL, True, UPCAST, IEEE)

    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
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
def _bwd_dkdv_inner(dk1, dk2, dka, dkb, dv, k1, k2, ka, kb, v, q_base, do_base, lse_base, delta_base, stride_qs,
                    stride_dos, offs_n, seq_len, pos_offset, lo, hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin,
                    DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_len
        q1, q2, qa, qb = _load_qk(q_base, offs_m, stride_qs, m_ok, Cos, Sin, pos_offset, BLOCK_M, HEAD_DIM,
                                  ROT_HALF, HP, PA, PB, DTYPE, UPCAST)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        do = _operand(do, DTYPE, UPCAST)
        # Rows past the end get lse = +inf, hence p = 0.
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        qk_t = _scores(k1, k2, ka, kb, q1, q2, qa, qb, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), HP, PA, PB, IEEE)
        p_t = tl.exp2(qk_t * sm_scale_log2 - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = _dot(_operand(p_t, DTYPE, UPCAST), do, dv, IEEE)
        dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE)
        ds_t = _operand(p_t * (dp_t - delta[None, :]), DTYPE, UPCAST)
        dk1, dk2, dka, dkb = _accumulate(dk1, dk2, dka, dkb, ds_t, q1, q2, qa, qb, HP, PA, PB, IEEE)
    return dk1, dk2, dka, dkb, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DV_, Cos, Sin,
                   stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                   stride_vs, stride_vb, stride_vh, stride_dos, stride_dob, stride_doh,
                   stride_dks, stride_dkb, stride_dkh, stride_dvs, stride_dvb, stride_dvh,
                   n_heads, seq_len, pos_offset, sm_scale, sm_scale_log2,
                   HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr,
                   PB: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    # Keys past the end load as zero; their dk/dv rows are never stored.
    k1, k2, ka, kb = _load_qk(k_base, offs_n, stride_ks, n_ok, Cos, Sin, pos_offset, BLOCK_N, HEAD_DIM, ROT_HALF,
                              HP, PA, PB, DTYPE, UPCAST)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    v = _operand(v, DTYPE, UPCAST)
    dk1, dk2, dka, dkb = _grad_accumulators(BLOCK_N, HP, PA, PB)
    dv = tl.zeros((BLOCK_N, DV), tl.float32)

    if CAUSAL:
        # Query blocks overlapping the diagonal need the causal mask; later ones do not.
        diag_lo = (start_n // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, seq_len)
        dk1, dk2, dka, dkb, dv = _bwd_dkdv_inner(
            dk1, dk2, dka, dkb, dv, k1, k2, ka, kb, v, q_base, do_base, lse_base, delta_base, stride_qs,
            stride_dos, offs_n, seq_len, pos_offset, diag_lo, diag_hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin,
            DTYPE, BLOCK_M, BLOCK_N, HEAD_DIM, ROT_HALF, HP, PA, PB, True, UPCAST, IEEE)
        lo = tl.maximum(diag_hi, diag_lo)
    else:
        lo = 0
    dk1, dk2, dka, dkb, dv = _bwd_dkdv_inner(
        dk1, dk2, dka, dkb, dv, k1, k2, ka, kb, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
        offs_n, seq_len, pos_offset, lo, seq_len, sm_scale_log2, offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_M, BLOCK_N,
        HEAD_DIM, ROT_HALF, HP, PA, PB, False, UPCAST, IEEE)

    _store_grad(DK + b * stride_dkb + h * stride_dkh, offs_n, stride_dks, n_ok, dk1, dk2, dka, dkb, sm_scale, Cos,
                Sin, pos_offset, HEAD_DIM, ROT_HALF, HP, PA, PB)
    tl.store(DV_ + b * stride_dvb + h * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvs + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_inner(dq1, dq2, dqa, dqb, q1, q2, qa, qb, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                  offs_m, seq_len, pos_offset, lo, hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin,
                  DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k1, k2, ka, kb = _load_qk(k_base, offs_n, stride_ks, n_ok, Cos, Sin, pos_offset, BLOCK_N, HEAD_DIM,
                                  ROT_HALF, HP, PA, PB, DTYPE, UPCAST)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        v = _operand(v, DTYPE, UPCAST)
        qk = _scores(q1, q2, qa, qb, k1, k2, ka, kb, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), HP, PA, PB, IEEE)
        p = tl.exp2(qk * sm_scale_log2 - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        ds = _operand(p * (dp - delta[:, None]), DTYPE, UPCAST)
        dq1, dq2, dqa, dqb = _accumulate(dq1, dq2, dqa, dqb, ds, k1, k2, ka, kb, HP, PA, PB, IEEE)
    return dq1, dq2, dqa, dqb


@triton.jit
def _attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, Cos, Sin,
                 stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                 stride_vs, stride_vb, stride_vh, stride_dos, stride_dob, stride_doh,
                 stride_dqs, stride_dqb, stride_dqh,
                 n_heads, seq_len, pos_offset, sm_scale, sm_scale_log2,
                 HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HP: tl.constexpr, PA: tl.constexpr,
                 PB: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
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
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < HEAD_DIM

    q1, q2, qa, qb = _load_qk(q_base, offs_m, stride_qs, m_ok, Cos, Sin, pos_offset, BLOCK_M, HEAD_DIM, ROT_HALF,
                              HP, PA, PB, DTYPE, UPCAST)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    do = _operand(do, DTYPE, UPCAST)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, mask=m_ok, other=0.0)
    dq1, dq2, dqa, dqb = _grad_accumulators(BLOCK_M, HP, PA, PB)

    if CAUSAL:
        full_end = tl.minimum((start_m + 1) // BLOCK_N, seq_len // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
    dq1, dq2, dqa, dqb = _bwd_dq_inner(
        dq1, dq2, dqa, dqb, q1, q2, qa, qb, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len,
        pos_offset, 0, full_end, sm_scale_log2, offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_M, BLOCK_N, HEAD_DIM,
        ROT_HALF, HP, PA, PB, CAUSAL, False, UPCAST, IEEE)
    dq1, dq2, dqa, dqb = _bwd_dq_inner(
        dq1, dq2, dqa, dqb, q1, q2, qa, qb, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seq_len,
        pos_offset, full_end, hi, sm_scale_log2, offs_dv, dv_ok, Cos, Sin, DTYPE, BLOCK_M, BLOCK_N, HEAD_DIM,
        ROT_HALF, HP, PA, PB, CAUSAL, True, UPCAST, IEEE)

    _store_grad(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqs, m_ok, dq1, dq2, dqa, dqb, sm_scale, Cos,
                Sin, pos_offset, HEAD_DIM, ROT_HALF, HP, PA, PB)


# ----------------------------------------------------------------------------------------
# launch configurations (checked for register spills with ptxas for sm_90a; docs/kernels.md)
# ----------------------------------------------------------------------------------------

_TUNE_KEY = ["seq_len", "HEAD_DIM", "ROT_HALF", "CAUSAL"]


# Two candidates per kernel for head dims <= 128 (compile time counts: each costs seconds)
# and one for larger heads, chosen with ptxas for sm_90a, bf16, causal: the first of each
# pair (head 128 / rotary 32) and the large-head ones (head 256 / rotary 64) spill no
# registers; larger tiles spill (fwd 128x128: 220 B, dkdv 64x128: 460 B; head 256 fwd
# 64x64 w4: 3.9 KB). See docs/benchmarks/kernels.md.
_FWD = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]
_FWD_LARGE = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)]
_DKDV = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
_DKDV_LARGE = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2)]
_DQ = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
       triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
_DQ_LARGE = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
_LARGE = {id(c) for c in _FWD_LARGE + _DKDV_LARGE + _DQ_LARGE}


def _by_head_dim(configs, named_args, **kwargs):
    """The large-head configurations for head dims > 128, the others otherwise."""
    large = int(named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 128))) > 128
    return [c for c in configs if (id(c) in _LARGE) == large]


def _tuned(kernel, configs):
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _by_head_dim},
                           **autotune_kwargs())(kernel)


if INTERPRETED:
    fwd_tuned = dkdv_tuned = dq_tuned = None
else:
    fwd_tuned = _tuned(_attn_fwd, _FWD + _FWD_LARGE)
    dkdv_tuned = _tuned(_attn_bwd_dkdv, _DKDV + _DKDV_LARGE)
    dq_tuned = _tuned(_attn_bwd_dq, _DQ + _DQ_LARGE)

fwd = _attn_fwd
bwd_dkdv = _attn_bwd_dkdv
bwd_dq = _attn_bwd_dq
bwd_delta = _bwd_delta
