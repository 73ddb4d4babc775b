"""Gated linear attention in Triton, chunked form (forward and backward).

Per (batch, head), the sequence splits into chunks of BT tokens; gc = cumulative log-decay inside a chunk,
gl = its last row, h_n = the state entering chunk n:
  intra     A_ij = sum_k q_ik k_jk exp(gc_ik - gc_jk) (j <= i), one [BT, BT] matrix per chunk, computed once
  states    h_{n+1} = exp(gl) * h_n + (k * exp(gl - gc))^T v       (sequential over chunks, matmuls inside)
  output    o = scale * ((q * exp(gc)) h_n + A v)
  backward  dh_n = exp(gl) * dh_{n+1} + scale * (q * exp(gc))^T do  (reverse over chunks), then per chunk
            dv = scale * A^T do + (k * exp(gl - gc)) dh_{n+1},  dA = scale * do v^T (lower),
            dq = scale * (do h_n^T) * exp(gc) + intra(dA, k),  dk = (v dh_{n+1}^T) * exp(gl - gc) + intra(dA^T, q),
            dg_t = sum_{s >= t} (q dq - k dk)_s: inside the chunk a short reverse cumsum, the chunks after it
            sum to sum_v h_{n+1} * dh_n (reduced by the reverse state walk), so no sum over T that cancels.
Intra-chunk terms (A, and dq, dk's intra parts): where the chunk's cumulative decay stays within
ONE_PRODUCT_SPAN of its middle row's, one product per key slice through that row (factors up to exp(+-60),
tf32x3 for 16-bit inputs); stronger decays take sub-chunks of BC rows factored through the last row of the
key sub-chunk (every exponent <= 0), with the diagonal sub-blocks formed element by element. The forward
chooses per chunk and the backward repeats the choice.
Precision: bf16 inputs take bf16 dot operands elsewhere (fp32 accumulation, as fla does) and bf16 state
snapshots; fp16 and fp32 inputs keep fp32 operands and snapshots (fp16's range cannot hold a long state).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_tiles import block as _block
from ..linear_tiles import dot_precision as _precision
from ..linear_tiles import load_rows as _load_rows
from ..linear_tiles import mm as _mm
from ..linear_tiles import row as _row
from ..linear_tiles import state_block, state_tile
from ..linear_tiles import store_rows as _store_rows


@triton.jit
def _gla_intra_kernel(Q, K, G, A, ONE_PRODUCT, T, H, KD: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, BKS: tl.constexpr, KS: tl.constexpr, SAFE_SPAN: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """A [B, H, N, BT, BT] (unscaled; bf16 for bf16 inputs, else fp32) for one chunk, and ONE_PRODUCT [B * H, N]
    (int8): whether the chunk took the one-product path, which the backward repeats."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    head = b * T * H * KD + h * KD
    idx = tl.arange(0, BT)
    base = A + (bh * tl.num_programs(0) + i_n) * BT * BT
    # exp(gc_i - gc_j) = exp(gc_i - gref) * exp(gref - gc_j) through the middle row: where both factors stay
    # within exp(+-SAFE_SPAN), one product per key slice gives the whole lower triangle, each term to its own
    # relative precision. PRECISE (tf32x3 for 16-bit inputs): the diagonal blocks, the largest entries, were
    # exact element-wise sums before; bf16 operands here raised o's error by 40 %
    span = tl.full([], 0.0, tl.float32)
    for k0 in range(0, BK, KS):
        gc = tl.cumsum(_load_rows(G + head, t0, T, H, KD, BT, KS, k0), 0)
        span = tl.maximum(span, tl.max(tl.max(tl.abs(gc - _row(gc, idx, BT // 2)[None, :]), 1), 0))
    one_product = span <= SAFE_SPAN
    tl.store(ONE_PRODUCT + bh * tl.num_programs(0) + i_n, one_product.to(tl.int8))
    if one_product:
        a = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, BK, KS):
            gc = tl.cumsum(_load_rows(G + head, t0, T, H, KD, BT, KS, k0), 0)
            gref = _row(gc, idx, BT // 2)
            q = _load_rows(Q + head, t0, T, H, KD, BT, KS, k0) * tl.exp(gc - gref[None, :])
            k = _load_rows(K + head, t0, T, H, KD, BT, KS, k0) * tl.exp(gref[None, :] - gc)
            a += tl.dot(q, tl.trans(k), input_precision=PRECISE)
        a = tl.where(idx[:, None] >= idx[None, :], a, 0.0)
        tl.store(base + idx[:, None] * BT + idx[None, :], a.to(A.dtype.element_ty))
    else:
        q = _load_rows(Q + head, t0, T, H, KD, BT, BK)
        k = _load_rows(K + head, t0, T, H, KD, BT, BK)
        gc = tl.cumsum(_load_rows(G + head, t0, T, H, KD, BT, BK), 0)
        _intra_subchunked(Q + head, K + head, G + head, base, q, k, gc, t0, T, H, KD, BK, BT, BC, BKS,
                          DOT_PRECISION)


@triton.jit
def _intra_subchunked(Q, K, G, base, q, k, gc, t0, T, H, KD: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, BKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Decays too strong for one product: sub-chunks of BC rows, every exponent <= 0."""
    idx = tl.arange(0, BT)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(BT // BC):
        gref = _row(gc, idx, s * BC + BC - 1)
        later = idx >= (s + 1) * BC  # query rows after key sub-chunk s
        inside = (idx >= s * BC) & (idx < (s + 1) * BC)
        qs = q * tl.exp(tl.where(later[:, None], gc - gref[None, :], float("-inf")))
        ks = k * tl.exp(tl.where(inside[:, None], gref[None, :] - gc, float("-inf")))
        a += _mm(qs, tl.trans(ks), Q.dtype.element_ty, DOT_PRECISION)
    off_diag = (idx[:, None] // BC) != (idx[None, :] // BC)
    tl.store(base + idx[:, None] * BT + idx[None, :], a.to(base.dtype.element_ty), mask=off_diag)
    sub = tl.arange(0, BC)
    for s in range(BT // BC):  # diagonal sub-blocks: element by element, straight to memory
        block = _diag_block(Q, K, G, t0 + s * BC, T, H, KD, BK, BC, BKS)
        tl.store(base + (s * BC + sub)[:, None] * BT + (s * BC + sub)[None, :], block.to(base.dtype.element_ty))


@triton.jit
def _diag_terms(ptr_a, ptr_b, G, r0, k0, T, H, KD: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr):
    """Rows [r0, r0 + BC), key columns [k0, k0 + BKS) of two [B, T, H, KD] tensors (fp32, zeros outside) and
    E[i, j, k] = exp(gc_i - gc_j) for j <= i (else 0), gc the cumulative log-decay inside these rows."""
    rows = r0 + tl.arange(0, BC)
    cols = k0 + tl.arange(0, BKS)
    offs = rows[:, None] * H * KD + cols[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < KD)
    a = tl.load(ptr_a + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptr_b + offs, mask=mask, other=0.0).to(tl.float32)
    gc = tl.cumsum(tl.load(G + offs, mask=mask, other=0.0).to(tl.float32), 0)
    sub = tl.arange(0, BC)
    lower = (sub[:, None] >= sub[None, :])[:, :, None]
    e = tl.exp(tl.where(lower, gc[:, None, :] - gc[None, :, :], float("-inf")))  # exponents <= 0 only
    return a, b, e


@triton.jit
def _diag_block(Q, K, G, r0, T, H, KD: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr):
    """A_ij = sum_k q_ik k_jk exp(gc_ik - gc_jk), i >= j, for the BC rows from r0: a [BC, BC, BKS] product
    per slice of BKS key columns (the exponentials of a whole sub-chunk at once, no row-by-row loop)."""
    block = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, BK, BKS):
        q, k, e = _diag_terms(Q, K, G, r0, k0, T, H, KD, BC, BKS)
        block += tl.sum(q[:, None, :] * k[None, :, :] * e, 2)
    return block


@triton.jit
def _gla_states_kernel(K, V, G, H0, HS, HT, T, H, NT,
                       KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """HS [B, H, N, K, V] (bf16 for bf16 inputs, else fp32): the state entering each chunk; HT the final state.
    One program per [BK, BV] state tile: the rows of a GLA state evolve independently (diagonal decay), so key
    tiles split too."""
    NKT: tl.constexpr = (KD + BK - 1) // BK
    k0 = (tl.program_id(0) % NKT) * BK
    v0 = (tl.program_id(0) // NKT) * BV
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_block(k0, v0, KD, VD, BK, BV)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    idx = tl.arange(0, BT)
    for n in range(NT):
        tl.store(HS + (bh * NT + n) * KD * VD + state_offs, state.to(HS.dtype.element_ty), mask=state_ok)
        k = _load_rows(K + head_k, n * BT, T, H, KD, BT, BK, k0)
        gc = tl.cumsum(_load_rows(G + head_k, n * BT, T, H, KD, BT, BK, k0), 0)
        v = _load_rows(V + head_v, n * BT, T, H, VD, BT, BV, v0)
        gl = _row(gc, idx, BT - 1)
        k_to_end = k * tl.exp(gl[None, :] - gc)
        state = state * tl.exp(gl)[:, None] + _mm(tl.trans(k_to_end), v, K.dtype.element_ty, DOT_PRECISION)
    if STORE_HT:
        tl.store(HT + bh * KD * VD + state_offs, state, mask=state_ok)


@triton.jit
def _gla_output_kernel(Q, V, G, A, HS, O, T, H, NT, scale,
                       KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    head_k = b * T * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    q = _load_rows(Q + head_k, i_n * BT, T, H, KD, BT, BK)
    gc = tl.cumsum(_load_rows(G + head_k, i_n * BT, T, H, KD, BT, BK), 0)
    v = _load_rows(V + head_v, i_n * BT, T, H, VD, BT, BV, i_v * BV)
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    h_n = tl.load(HS + (bh * NT + i_n) * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    idx = tl.arange(0, BT)
    a = tl.load(A + (bh * NT + i_n) * BT * BT + idx[:, None] * BT + idx[None, :])
    dt = Q.dtype.element_ty
    o = _mm(q * tl.exp(gc), h_n, dt, DOT_PRECISION) + _mm(a, v, dt, DOT_PRECISION)
    _store_rows(O + head_v, o * scale, i_n * BT, T, H, VD, BT, BV, i_v * BV)


@triton.jit
def _gla_dstates_kernel(Q, G, DO, HS, DHT, DHS, DH0, CARRY, T, H, NT, scale,
                        KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                        HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DHS [B, H, N, K, V] (HS's dtype): the gradient of the state leaving each chunk; DH0 that of the initial state.
    One program per [BK, BV] tile, as in the forward walk. CARRY [B * H, V / BV, N, K]: this tile's part of
    sum_v h_{n+1} * dh_n, what every later chunk adds to chunk n's decay gradient (zero for the last chunk)."""
    NKT: tl.constexpr = (KD + BK - 1) // BK
    i_k = tl.program_id(0) % NKT
    i_v = tl.program_id(0) // NKT
    k0 = i_k * BK
    v0 = i_v * BV
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_block(k0, v0, KD, VD, BK, BV)
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dh += tl.load(DHT + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    idx = tl.arange(0, BT)
    keys = k0 + tl.arange(0, BK)
    nvt = tl.num_programs(0) // NKT
    carry_row = CARRY + (bh * nvt + i_v) * NT * KD + keys
    tl.store(carry_row + (NT - 1) * KD, tl.zeros([BK], dtype=tl.float32), mask=keys < KD)
    for i in range(NT):
        n = NT - 1 - i
        tl.store(DHS + (bh * NT + n) * KD * VD + state_offs, dh.to(DHS.dtype.element_ty), mask=state_ok)
        if n < NT - 1:
            h_next = tl.load(HS + (bh * NT + n + 1) * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
            tl.store(carry_row + n * KD, tl.sum(h_next * dh, 1), mask=keys < KD)
        q = _load_rows(Q + head_k, n * BT, T, H, KD, BT, BK, k0)
        gc = tl.cumsum(_load_rows(G + head_k, n * BT, T, H, KD, BT, BK, k0), 0)
        do = _load_rows(DO + head_v, n * BT, T, H, VD, BT, BV, v0)
        gl = _row(gc, idx, BT - 1)
        dh = dh * tl.exp(gl)[:, None] + _mm(tl.trans(q * tl.exp(gc) * scale), do, Q.dtype.element_ty, DOT_PRECISION)
    if STORE_DH0:
        tl.store(DH0 + bh * KD * VD + state_offs, dh, mask=state_ok)


@triton.jit
def _gla_chunk_bwd_kernel(Q, K, V, G, A, HS, DHS, DO, DQ, DK, DV, ONE_PRODUCT, CARRY, DG, n_carry, T, H, NT, scale,
                          KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr, KS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """dq, dk (fp32, before dg) and dv (fp32) of one chunk, in slices of KS key columns: whole [BT, K] fp32
    tiles (q, k, gc, dq, dk at once) spilled registers. dV contracts over the keys, so it comes first, with
    dA; then each key slice's dq, dk: in one product where the forward took one (ONE_PRODUCT), else by
    sub-chunks and then the diagonal sub-blocks."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    head_k = b * T * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    state = (bh * NT + i_n) * KD * VD
    idx = tl.arange(0, BT)
    dt = Q.dtype.element_ty
    a = tl.load(A + (bh * NT + i_n) * BT * BT + idx[:, None] * BT + idx[None, :])
    da = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, VD, BV):
        do = _load_rows(DO + head_v, t0, T, H, VD, BT, BV, v0)
        da += _mm(do, tl.trans(_load_rows(V + head_v, t0, T, H, VD, BT, BV, v0)), dt, DOT_PRECISION)
        dv = _mm(tl.trans(a), do, dt, DOT_PRECISION) * scale
        for k0 in range(0, BK, KS):
            gc = tl.cumsum(_load_rows(G + head_k, t0, T, H, KD, BT, KS, k0), 0)
            k_to_end = _load_rows(K + head_k, t0, T, H, KD, BT, KS, k0) * tl.exp(_row(gc, idx, BT - 1)[None, :] - gc)
            offs, ok = state_block(k0, v0, KD, VD, KS, BV)
            dv += _mm(k_to_end, tl.load(DHS + state + offs, mask=ok, other=0.0), dt, DOT_PRECISION)
        _store_rows(DV + head_v, dv, t0, T, H, VD, BT, BV, v0)
    da = tl.where(idx[:, None] >= idx[None, :], da * scale, 0.0)
    one_product = tl.load(ONE_PRODUCT + bh * NT + i_n) != 0
    for k0 in range(0, BK, KS):
        q = _load_rows(Q + head_k, t0, T, H, KD, BT, KS, k0)
        k = _load_rows(K + head_k, t0, T, H, KD, BT, KS, k0)
        gc = tl.cumsum(_load_rows(G + head_k, t0, T, H, KD, BT, KS, k0), 0)
        gl = _row(gc, idx, BT - 1)
        dq = tl.zeros([BT, KS], dtype=tl.float32)
        dk = tl.zeros([BT, KS], dtype=tl.float32)
        for v0 in range(0, VD, BV):
            offs, ok = state_block(k0, v0, KD, VD, KS, BV)
            dq += _mm(_load_rows(DO + head_v, t0, T, H, VD, BT, BV, v0),
                      tl.trans(tl.load(HS + state + offs, mask=ok, other=0.0)), dt, DOT_PRECISION)
            dk += _mm(_load_rows(V + head_v, t0, T, H, VD, BT, BV, v0),
                      tl.trans(tl.load(DHS + state + offs, mask=ok, other=0.0)), dt, DOT_PRECISION)
        dq = dq * tl.exp(gc) * scale
        dk = dk * tl.exp(gl[None, :] - gc)
        # intra-chunk: dq_i += sum_j dA_ij k_j exp(gc_i - gc_j), dk_j += sum_i dA_ij q_i exp(gc_i - gc_j)
        if one_product:
            gref = _row(gc, idx, BT // 2)
            e_q = tl.exp(gc - gref[None, :])
            e_k = tl.exp(gref[None, :] - gc)
            dq += tl.dot(da, k * e_k, input_precision=PRECISE) * e_q
            dk += tl.dot(tl.trans(da), q * e_q, input_precision=PRECISE) * e_k
        else:
            for s in range(BT // BC):
                gref = _row(gc, idx, s * BC + BC - 1)
                later = idx >= (s + 1) * BC
                inside = (idx >= s * BC) & (idx < (s + 1) * BC)
                e_q = tl.exp(tl.where(later[:, None], gc - gref[None, :], float("-inf")))
                e_k = tl.exp(tl.where(inside[:, None], gref[None, :] - gc, float("-inf")))
                dq += _mm(tl.where(inside[None, :], da, 0.0), k * e_k, dt, DOT_PRECISION) * e_q
                dk += _mm(tl.trans(tl.where(later[:, None], da, 0.0)), q * e_q, dt, DOT_PRECISION) * e_k
        _store_rows(DQ + head_k, dq, t0, T, H, KD, BT, KS, k0)
        _store_rows(DK + head_k, dk, t0, T, H, KD, BT, KS, k0)
    if not one_product:
        tl.debug_barrier()  # the diagonal sub-blocks add to rows other threads just stored
        _bwd_diagonal_blocks(Q, K, V, G, DO, DQ, DK, head_k, head_v, t0, T, H, scale, KD, VD, BK, BV, BT, BC, BKS,
                             DOT_PRECISION)
    # dg_t = sum_{s >= t} (q dq - k dk)_s: inside the chunk a reverse cumsum of the final dq, dk rows (stored
    # above, by other threads too), plus what the later chunks add, sum_v h_{n+1} * dh_n (CARRY: one part per
    # value tile of the reverse walk). No sum over the whole sequence, so no cancellation that grows with T.
    tl.debug_barrier()
    for k0 in range(0, BK, KS):
        cols = k0 + tl.arange(0, KS)
        after = tl.zeros([KS], dtype=tl.float32)
        for i_v in range(n_carry):
            after += tl.load(CARRY + ((bh * n_carry + i_v) * NT + i_n) * KD + cols, mask=cols < KD, other=0.0)
        x = _load_rows(Q + head_k, t0, T, H, KD, BT, KS, k0) * _load_rows(DQ + head_k, t0, T, H, KD, BT, KS, k0) \
            - _load_rows(K + head_k, t0, T, H, KD, BT, KS, k0) * _load_rows(DK + head_k, t0, T, H, KD, BT, KS, k0)
        _store_rows(DG + head_k, tl.cumsum(x, 0, reverse=True) + after[None, :], t0, T, H, KD, BT, KS, k0)


@triton.jit
def _bwd_diagonal_blocks(Q, K, V, G, DO, DQ, DK, head_k, head_v, t0, T, H, scale, KD: tl.constexpr,
                         VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         BKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The sub-chunked path's diagonal sub-blocks, added to the stored dq, dk rows."""
    dt = Q.dtype.element_ty
    sub = tl.arange(0, BC)
    for s in range(BT // BC):
        # dA of this diagonal sub-block again (a register tile cannot be sliced), then the [BC, BC, BKS]
        # products per slice of key columns, added to the stored dq, dk rows
        r0 = t0 + s * BC
        da_s = tl.zeros([BC, BC], dtype=tl.float32)
        for v0 in range(0, VD, BV):
            da_s += _mm(_load_rows(DO + head_v, r0, T, H, VD, BC, BV, v0),
                        tl.trans(_load_rows(V + head_v, r0, T, H, VD, BC, BV, v0)), dt, DOT_PRECISION)
        da_s = tl.where(sub[:, None] >= sub[None, :], da_s * scale, 0.0)[:, :, None]
        for k0 in range(0, BK, BKS):
            q_s, k_s, e = _diag_terms(Q + head_k, K + head_k, G + head_k, r0, k0, T, H, KD, BC, BKS)
            rows = r0 + sub
            cols = k0 + tl.arange(0, BKS)
            offs = rows[:, None] * H * KD + cols[None, :]
            mask = (rows[:, None] < T) & (cols[None, :] < KD)
            dq_s = tl.load(DQ + head_k + offs, mask=mask, other=0.0) + tl.sum(da_s * k_s[None, :, :] * e, 1)
            dk_s = tl.load(DK + head_k + offs, mask=mask, other=0.0) + tl.sum(da_s * q_s[:, None, :] * e, 0)
            tl.store(DQ + head_k + offs, dq_s, mask=mask)
            tl.store(DK + head_k + offs, dk_s, mask=mask)


# warps / pipeline stages per kernel, from ptxas's register report (benchmarks/register_report.py) rather than
# GPU timing: the backward at 8 warps and 32-column key slices spills nothing at K = 128 (whole [64, 128] fp32
# tiles spilled 1.8 KB a thread, and the kernel took 7.7 ms of the 13.6 ms forward+backward on the H200).
LAUNCH = {
    "intra": dict(num_warps=8, num_stages=2),  # ptxas (sm_90a, K 128): 8 warps spill nothing, 4 spill 300 B
    "states": dict(num_warps=4, num_stages=2),
    "output": dict(num_warps=4, num_stages=2),
    "dstates": dict(num_warps=4, num_stages=2),
    "bwd": dict(num_warps=8, num_stages=1),
}


# A chunk whose cumulative log-decay stays within this of its middle row's (every key column) forms its
# intra-chunk matrix, and the backward its intra-chunk gradients, as one product through the middle row:
# factors within exp(+-60) ~ 1e26 stay finite in fp32 and bf16 with room for the sums. The dash candidate's
# gates (logsigmoid / 16) always qualify; stronger decays take the sub-chunked path (all exponents <= 0).
ONE_PRODUCT_SPAN = 60.0


# key columns per [BC, BC, BKS] product of a diagonal sub-block (16 x 16 x 16 fp32: 32 registers a thread at
# 4 warps, for each of the few live 3-D tiles)
DIAG_KEY_SLICE = 16


def backward_key_slice(bt: int) -> int:
    """Key columns per slice of the per-chunk backward (16 under the interpreter's 16-token chunks, so that its
    tests cross slices)."""
    return 16 if bt < 64 else 32  # ptxas (sm_90a, K 128, 8 warps): 32 spills nothing, 64 spills 100 B


def walk_tiles(key_dim: int, value_dim: int) -> tuple:
    """State tile [BK, BV] of the sequential walks: small, so that B * H * (K / BK) * (V / BV) programs fill the
    GPU (each walk is a chain of dependent steps; at B 4, H 16, K = V = 128 this gives 512 programs, not 128)."""
    return min(_block(key_dim), 64), min(_block(value_dim), 32)


def _precise(prec: str) -> str:
    """Products of the one-product intra-chunk path: near-fp32 (3 tf32 products) unless already exact."""
    return "ieee" if prec == "ieee" else "tf32x3"


def chunk_sizes(interpreting: bool) -> tuple:
    return (16, 8) if interpreting else (64, 16)  # (BT, BC)


def gla_chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, bt, bc):
    """q, k, g [B, T, H, K] and v [B, T, H, V], contiguous. Returns o, final state, and what backward needs."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), min(_block(value_dim), 64)
    dev = q.device
    # A in bf16 for bf16 inputs: both of its uses (A v, A^T dO) round it to bf16 as a dot operand anyway
    a = torch.empty(batch, heads, nt, bt, bt, device=dev,
                    dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32)
    # per-chunk state snapshots [B, H, N, K, V], the op's largest tensors, in bf16 for bf16 inputs: every use
    # rounds them to bf16 anyway (dot operands), and dg's carry (sum_v h * dh) sums 64-row chunks, not the
    # whole sequence, so 16-bit snapshots no longer make its error grow with T (they did: 2.6e-2 at T 16384).
    # fp16 inputs keep fp32 snapshots: a state summed over thousands of steps can pass fp16's 65504.
    hs = torch.empty(batch, heads, nt, key_dim, value_dim, device=dev,
                     dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32)
    final = torch.empty(batch, heads, key_dim, value_dim, device=dev, dtype=torch.float32) \
        if output_final_state else a  # never written
    o = torch.empty(batch, seq, heads, value_dim, device=dev, dtype=q.dtype)
    prec = _precision(q.dtype)
    one_product = torch.empty(batch * heads, nt, device=dev, dtype=torch.int8)
    _gla_intra_kernel[(nt, batch * heads)](q, k, g, a, one_product, seq, heads, KD=key_dim, BK=bk, BT=bt, BC=bc,
                                           BKS=DIAG_KEY_SLICE, KS=min(bk, backward_key_slice(bt)),
                                           SAFE_SPAN=ONE_PRODUCT_SPAN, DOT_PRECISION=prec,
                                           PRECISE=_precise(prec), **LAUNCH["intra"])
    h0 = initial_state.contiguous() if initial_state is not None else hs
    nv = triton.cdiv(value_dim, bv)
    bkw, bvw = walk_tiles(key_dim, value_dim)
    _gla_states_kernel[(triton.cdiv(key_dim, bkw) * triton.cdiv(value_dim, bvw), batch * heads)](
        k, v, g, h0, hs, final, seq, heads, nt, KD=key_dim, VD=value_dim, BK=bkw, BV=bvw, BT=bt,
        HAS_H0=initial_state is not None, STORE_HT=output_final_state, DOT_PRECISION=prec, **LAUNCH["states"])
    _gla_output_kernel[(nv, nt, batch * heads)](
        q, v, g, a, hs, o, seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bk, BV=bv, BT=bt,
        DOT_PRECISION=prec, **LAUNCH["output"])
    return o, (final if output_final_state else None), a, hs, one_product


def gla_chunk_bwd(q, k, v, g, do, a, hs, one_product, scale, initial_state, final_state, d_final, bt, bc):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), min(_block(value_dim), 64)
    dev = q.device
    prec = _precision(q.dtype)
    do = do.contiguous()
    dhs = torch.empty(hs.shape, device=dev, dtype=hs.dtype)  # likewise: the dots take it in the inputs' dtype
    dh0 = torch.empty(batch, heads, key_dim, value_dim, device=dev, dtype=torch.float32) \
        if initial_state is not None else dhs
    dht = d_final.contiguous() if d_final is not None else dhs
    bkw, bvw = walk_tiles(key_dim, value_dim)
    nkw, nvw = triton.cdiv(key_dim, bkw), triton.cdiv(value_dim, bvw)
    carry = torch.empty(batch * heads, nvw, nt, key_dim, device=dev, dtype=torch.float32)
    _gla_dstates_kernel[(nkw * nvw, batch * heads)](
        q, g, do, hs, dht, dhs, dh0, carry, seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bkw, BV=bvw,
        BT=bt, HAS_DHT=d_final is not None, STORE_DH0=initial_state is not None, DOT_PRECISION=prec,
        **LAUNCH["dstates"])
    if d_final is not None:  # the final state's gradient reaches every decay of the last chunk
        carry[:, 0, -1] += (d_final.float() * final_state).sum(-1).view(batch * heads, key_dim)
    dq = torch.empty(q.shape, device=dev, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty(v.shape, device=dev, dtype=torch.float32)
    dg = torch.empty_like(dq)
    _gla_chunk_bwd_kernel[(nt, batch * heads)](
        q, k, v, g, a, hs, dhs, do, dq, dk, dv, one_product, carry, dg, nvw, seq, heads, nt, scale, KD=key_dim,
        VD=value_dim, BK=bk, BV=bv, BT=bt, BC=bc, BKS=DIAG_KEY_SLICE, KS=min(bk, backward_key_slice(bt)),
        DOT_PRECISION=prec, PRECISE=_precise(prec), **LAUNCH["bwd"])
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


class GLAChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, interpreting):
        bt, bc = chunk_sizes(interpreting)
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        o, final, a, hs, one_product = gla_chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, bt, bc)
        ctx.save_for_backward(q, k, v, g, a, hs, one_product, initial_state, final)
        ctx.scale, ctx.sizes = scale, (bt, bc)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, a, hs, one_product, initial_state, final = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, dg, dh0 = gla_chunk_bwd(q, k, v, g, do, a, hs, one_product, ctx.scale, initial_state, final,
                                            d_final, *ctx.sizes)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), None,
                None if dh0 is None else dh0.to(initial_state.dtype), None, None)
