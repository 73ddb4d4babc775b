"""Gated linear attention in Triton, chunked form (forward and backward).

Per (batch, head), the sequence splits into chunks of BT tokens; gc = cumulative log-decay inside a chunk (one
small kernel forms it once, in fp32, for every later kernel), gl = its last row, h_n = the state entering chunk n:
  intra     A_ij = sum_k q_ik k_jk exp(gc_ik - gc_jk) (j <= i), one [BT, BT] matrix per chunk, computed once
  states    h_{n+1} = exp(gl) * h_n + (k * exp(gl - gc))^T v       (sequential over chunks, matmuls inside)
  output    o = scale * ((q * exp(gc)) h_n + A v)
  backward  dh_n = exp(gl) * dh_{n+1} + scale * (q * exp(gc))^T do  (reverse over chunks), then per chunk
            dv = scale * A^T do + (k * exp(gl - gc)) dh_{n+1}                       (per value tile)
            dA = scale * do v^T (lower),
            dq = scale * (do h_n^T) * exp(gc) + intra(dA, k),  dk = (v dh_{n+1}^T) * exp(gl - gc) + intra(dA^T, q),
            dg_t = sum_{s >= t} (q dq - k dk)_s                                      (per key slice)
            dg: inside the chunk a short reverse cumsum; the chunks after it sum to sum_v h_{n+1} * dh_n (reduced
            by the reverse state walk), so no sum over T that cancels.
Intra-chunk terms (A, and dq, dk's intra parts): where the chunk's cumulative decay stays within
ONE_PRODUCT_SPAN of its middle row's, one product per key slice through that row (factors up to exp(+-60),
tf32x3 for 16-bit inputs). Stronger decays take an exact element-wise path, one row of the chunk at a time
(every exponent <= 0). The cumsum kernel chooses per chunk; each intra-chunk kernel is compiled once per path
and launched for both, each program doing the chunks of its own path, so the rare strong-decay code costs the
common path no registers.
Precision: bf16 inputs take bf16 dot operands elsewhere (fp32 accumulation, as fla does) and bf16 state
snapshots; fp16 and fp32 inputs keep fp32 operands and snapshots (fp16's range cannot hold a long state).
Gradients are written in the inputs' dtypes by the kernels that finish them (no fp32 copies and casts).
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
def _gc_row(GC, r, H, KD: tl.constexpr, BK: tl.constexpr, k0):
    """Row r, key columns [k0, k0 + BK) of one head of the padded cumulative decay (every row exists)."""
    cols = k0 + tl.arange(0, BK)
    return tl.load(GC + r * H * KD + cols, mask=cols < KD, other=0.0)


@triton.jit
def _gla_cumsum_kernel(G, GC, ONE_PRODUCT, T, TP, H, KD: tl.constexpr, BT: tl.constexpr, KS: tl.constexpr,
                       SAFE_SPAN: tl.constexpr):
    """GC [B, TP, H, K] fp32, TP = T rounded up to whole chunks: the cumulative log-decay inside each chunk (rows
    past T continue the last one: zero decay there). ONE_PRODUCT [B * H, N] int8: whether every |gc - gc_mid|
    of the chunk is within SAFE_SPAN, so that its intra-chunk terms can go through the middle row."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    idx = tl.arange(0, BT)
    span = tl.full([], 0.0, tl.float32)
    for k0 in range(0, KD, KS):
        gc = tl.cumsum(_load_rows(G + b * T * H * KD + h * KD, t0, T, H, KD, BT, KS, k0), 0)
        _store_rows(GC + b * TP * H * KD + h * KD, gc, t0, TP, H, KD, BT, KS, k0)
        span = tl.maximum(span, tl.max(tl.max(tl.abs(gc - _row(gc, idx, BT // 2)[None, :]), 1), 0))
    tl.store(ONE_PRODUCT + bh * tl.num_programs(0) + i_n, (span <= SAFE_SPAN).to(tl.int8))


@triton.jit
def _gla_intra_kernel(Q, K, GC, A, ONE_PRODUCT, T, TP, H, KD: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                      KS: tl.constexpr, PATH: tl.constexpr, PRECISE: tl.constexpr):
    """A [B, H, N, BT, BT] (unscaled; bf16 for bf16 inputs, else fp32) of the chunks whose ONE_PRODUCT flag equals
    PATH (1: one product per key slice through the middle row; 0: exact, one key row at a time)."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    head = b * T * H * KD + h * KD
    head_gc = b * TP * H * KD + h * KD
    idx = tl.arange(0, BT)
    base = A + (bh * tl.num_programs(0) + i_n) * BT * BT
    if tl.load(ONE_PRODUCT + bh * tl.num_programs(0) + i_n) == PATH:
        if PATH == 1:
            # exp(gc_i - gc_j) = exp(gc_i - gref) * exp(gref - gc_j) through the middle row: both factors within
            # exp(+-SAFE_SPAN), each term to its own relative precision. PRECISE (tf32x3 for 16-bit inputs): the
            # diagonal entries, the largest, lost 40 % of o's accuracy to bf16 operands here
            a = tl.zeros([BT, BT], dtype=tl.float32)
            for k0 in range(0, BK, KS):
                gc = _load_rows(GC + head_gc, t0, TP, H, KD, BT, KS, k0)
                gref = _gc_row(GC + head_gc, t0 + BT // 2, H, KD, KS, k0)
                q = _load_rows(Q + head, t0, T, H, KD, BT, KS, k0) * tl.exp(gc - gref[None, :])
                k = _load_rows(K + head, t0, T, H, KD, BT, KS, k0) * tl.exp(gref[None, :] - gc)
                a += tl.dot(q, tl.trans(k), input_precision=PRECISE)
            a = tl.where(idx[:, None] >= idx[None, :], a, 0.0)
            tl.store(base + idx[:, None] * BT + idx[None, :], a.to(A.dtype.element_ty))
        else:
            # decays too strong to factor: column j of A is sum_k q_ik k_jk exp(gc_ik - gc_jk), exponents <= 0
            q = _load_rows(Q + head, t0, T, H, KD, BT, BK)
            gc = _load_rows(GC + head_gc, t0, TP, H, KD, BT, BK)
            cols = tl.arange(0, BK)
            for j in range(BT):
                k_j = tl.load(K + head + (t0 + j) * H * KD + cols, mask=cols < tl.where(t0 + j < T, KD, 0),
                              other=0.0).to(tl.float32)
                gc_j = _gc_row(GC + head_gc, t0 + j, H, KD, BK, 0)
                e = tl.exp(tl.where(idx[:, None] >= j, gc - gc_j[None, :], float("-inf")))
                tl.store(base + idx * BT + j, tl.sum(q * k_j[None, :] * e, 1).to(A.dtype.element_ty))


@triton.jit
def _gla_states_kernel(K, V, GC, H0, HS, HT, T, TP, H, NT, V0,
                       KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """HS [B, H, N, K, V] (bf16 for bf16 inputs, else fp32): the state entering each chunk; HT the final state.
    One program per [BK, BV] state tile: the rows of a GLA state evolve independently (diagonal decay), so key
    tiles split too. V0: the first value column of this launch's tiles (a narrower tail tile has its own)."""
    NKT: tl.constexpr = (KD + BK - 1) // BK
    k0 = (tl.program_id(0) % NKT) * BK
    v0 = V0 + (tl.program_id(0) // NKT) * BV
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_block(k0, v0, KD, VD, BK, BV)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head_gc = b * TP * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    for n in range(NT):
        tl.store(HS + (bh * NT + n) * KD * VD + state_offs, state.to(HS.dtype.element_ty), mask=state_ok)
        k = _load_rows(K + head_k, n * BT, T, H, KD, BT, BK, k0)
        gc = _load_rows(GC + head_gc, n * BT, TP, H, KD, BT, BK, k0)
        v = _load_rows(V + head_v, n * BT, T, H, VD, BT, BV, v0)
        gl = _gc_row(GC + head_gc, n * BT + BT - 1, H, KD, BK, k0)
        k_to_end = k * tl.exp(gl[None, :] - gc)
        state = state * tl.exp(gl)[:, None] + _mm(tl.trans(k_to_end), v, K.dtype.element_ty, DOT_PRECISION)
    if STORE_HT:
        tl.store(HT + bh * KD * VD + state_offs, state, mask=state_ok)


@triton.jit
def _gla_output_kernel(Q, V, GC, A, HS, O, T, TP, H, NT, V0, scale,
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
    gc = _load_rows(GC + b * TP * H * KD + h * KD, i_n * BT, TP, H, KD, BT, BK)
    v = _load_rows(V + head_v, i_n * BT, T, H, VD, BT, BV, (V0 + i_v * BV))
    state_offs, state_ok = state_tile((V0 + i_v * BV), KD, VD, BK, BV)
    h_n = tl.load(HS + (bh * NT + i_n) * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    idx = tl.arange(0, BT)
    a = tl.load(A + (bh * NT + i_n) * BT * BT + idx[:, None] * BT + idx[None, :])
    dt = Q.dtype.element_ty
    o = _mm(q * tl.exp(gc), h_n, dt, DOT_PRECISION) + _mm(a, v, dt, DOT_PRECISION)
    _store_rows(O + head_v, o * scale, i_n * BT, T, H, VD, BT, BV, (V0 + i_v * BV))


@triton.jit
def _gla_dstates_kernel(Q, GC, DO, HS, DHT, DHS, DH0, CARRY, T, TP, H, NT, V0, TILE0, N_TILES, scale,
                        KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                        HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DHS [B, H, N, K, V] (HS's dtype): the gradient of the state leaving each chunk; DH0 that of the initial state.
    One program per [BK, BV] tile, as in the forward walk (V0 as there). CARRY [B * H, N_TILES, N, K]: this
    tile's part of sum_v h_{n+1} * dh_n, what every later chunk adds to chunk n's decay gradient (zero for the
    last chunk); TILE0 is the index of this launch's first value tile among all N_TILES."""
    NKT: tl.constexpr = (KD + BK - 1) // BK
    i_k = tl.program_id(0) % NKT
    i_v = TILE0 + tl.program_id(0) // NKT
    k0 = i_k * BK
    v0 = V0 + (tl.program_id(0) // NKT) * BV
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_block(k0, v0, KD, VD, BK, BV)
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dh += tl.load(DHT + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head_gc = b * TP * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    keys = k0 + tl.arange(0, BK)
    carry_row = CARRY + (bh * N_TILES + i_v) * NT * KD + keys
    tl.store(carry_row + (NT - 1) * KD, tl.zeros([BK], dtype=tl.float32), mask=keys < KD)
    for i in range(NT):
        n = NT - 1 - i
        tl.store(DHS + (bh * NT + n) * KD * VD + state_offs, dh.to(DHS.dtype.element_ty), mask=state_ok)
        if n < NT - 1:
            h_next = tl.load(HS + (bh * NT + n + 1) * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
            tl.store(carry_row + n * KD, tl.sum(h_next * dh, 1), mask=keys < KD)
        q = _load_rows(Q + head_k, n * BT, T, H, KD, BT, BK, k0)
        gc = _load_rows(GC + head_gc, n * BT, TP, H, KD, BT, BK, k0)
        do = _load_rows(DO + head_v, n * BT, T, H, VD, BT, BV, v0)
        gl = _gc_row(GC + head_gc, n * BT + BT - 1, H, KD, BK, k0)
        dh = dh * tl.exp(gl)[:, None] + _mm(tl.trans(q * tl.exp(gc) * scale), do, Q.dtype.element_ty, DOT_PRECISION)
    if STORE_DH0:
        tl.store(DH0 + bh * KD * VD + state_offs, dh, mask=state_ok)


@triton.jit
def _gla_bwd_dv_kernel(K, GC, A, DHS, DO, DV, T, TP, H, NT, V0, scale,
                       KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       KS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dv of one chunk and value tile: scale * A^T do + (k * exp(gl - gc)) dh_{n+1}, in v's dtype."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    v0 = V0 + i_v * BV
    head_k = b * T * H * KD + h * KD
    head_gc = b * TP * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    state = (bh * NT + i_n) * KD * VD
    dt = K.dtype.element_ty
    idx = tl.arange(0, BT)
    a = tl.load(A + (bh * NT + i_n) * BT * BT + idx[:, None] * BT + idx[None, :])
    dv = _mm(tl.trans(a), _load_rows(DO + head_v, t0, T, H, VD, BT, BV, v0), dt, DOT_PRECISION) * scale
    for k0 in range(0, BK, KS):
        gc = _load_rows(GC + head_gc, t0, TP, H, KD, BT, KS, k0)
        gl = _gc_row(GC + head_gc, t0 + BT - 1, H, KD, KS, k0)
        k_to_end = _load_rows(K + head_k, t0, T, H, KD, BT, KS, k0) * tl.exp(gl[None, :] - gc)
        offs, ok = state_block(k0, v0, KD, VD, KS, BV)
        dv += _mm(k_to_end, tl.load(DHS + state + offs, mask=ok, other=0.0), dt, DOT_PRECISION)
    _store_rows(DV + head_v, dv, t0, T, H, VD, BT, BV, v0)


@triton.jit
def _dqk_value_tile(V, HS, DHS, DO, head_v, state, t0, k0, v0, T, H, KD: tl.constexpr, VD: tl.constexpr,
                    BT: tl.constexpr, KS: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One value tile's share of do v^T (dA), do h^T (dq) and v dh^T (dk), for a key slice."""
    do = _load_rows(DO + head_v, t0, T, H, VD, BT, BV, v0)
    v = _load_rows(V + head_v, t0, T, H, VD, BT, BV, v0)
    offs, ok = state_block(k0, v0, KD, VD, KS, BV)
    return (_mm(do, tl.trans(v), DT, DOT_PRECISION),
            _mm(do, tl.trans(tl.load(HS + state + offs, mask=ok, other=0.0)), DT, DOT_PRECISION),
            _mm(v, tl.trans(tl.load(DHS + state + offs, mask=ok, other=0.0)), DT, DOT_PRECISION))


@triton.jit
def _gla_bwd_dqk_kernel(Q, K, V, GC, HS, DHS, DO, DQ, DK, DG, ONE_PRODUCT, CARRY, n_carry, T, TP, H, NT, scale,
                        KD: tl.constexpr, VD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, KS: tl.constexpr,
                        V_WHOLE: tl.constexpr, BV_TAIL: tl.constexpr,
                        PATH: tl.constexpr, DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """dq, dk and dg of one chunk and slice of KS key columns, in the inputs' dtypes, for the chunks whose
    ONE_PRODUCT flag equals PATH. Every key column's dq, dk and dg depend on that column alone (and on dA, which
    each slice forms again: a [BT, BT] product, cheaper than a round trip through memory)."""
    i_k = tl.program_id(0)
    i_n = tl.program_id(1)
    bh = tl.program_id(2)
    if tl.load(ONE_PRODUCT + bh * NT + i_n) == PATH:
        b = bh // H
        h = bh % H
        t0 = i_n * BT
        k0 = i_k * KS
        head_k = b * T * H * KD + h * KD
        head_gc = b * TP * H * KD + h * KD
        head_v = b * T * H * VD + h * VD
        state = (bh * NT + i_n) * KD * VD
        idx = tl.arange(0, BT)
        dt = Q.dtype.element_ty
        da = tl.zeros([BT, BT], dtype=tl.float32)
        dq = tl.zeros([BT, KS], dtype=tl.float32)
        dk = tl.zeros([BT, KS], dtype=tl.float32)
        for v0 in range(0, V_WHOLE, BV):  # whole value tiles, then the narrower tail (V = D + 1: one column)
            part_a, part_q, part_k = _dqk_value_tile(V, HS, DHS, DO, head_v, state, t0, k0, v0, T, H, KD, VD, BT,
                                                     KS, BV, dt, DOT_PRECISION)
            da, dq, dk = da + part_a, dq + part_q, dk + part_k
        if BV_TAIL > 0:
            part_a, part_q, part_k = _dqk_value_tile(V, HS, DHS, DO, head_v, state, t0, k0, V_WHOLE, T, H, KD, VD,
                                                     BT, KS, BV_TAIL, dt, DOT_PRECISION)
            da, dq, dk = da + part_a, dq + part_q, dk + part_k
        da = tl.where(idx[:, None] >= idx[None, :], da * scale, 0.0)
        q = _load_rows(Q + head_k, t0, T, H, KD, BT, KS, k0)
        k = _load_rows(K + head_k, t0, T, H, KD, BT, KS, k0)
        gc = _load_rows(GC + head_gc, t0, TP, H, KD, BT, KS, k0)
        gl = _gc_row(GC + head_gc, t0 + BT - 1, H, KD, KS, k0)
        dq = dq * tl.exp(gc) * scale
        dk = dk * tl.exp(gl[None, :] - gc)
        # intra-chunk: dq_i += sum_j dA_ij k_j exp(gc_i - gc_j), dk_j += sum_i dA_ij q_i exp(gc_i - gc_j)
        if PATH == 1:
            gref = _gc_row(GC + head_gc, t0 + BT // 2, H, KD, KS, k0)
            e_q = tl.exp(gc - gref[None, :])
            e_k = tl.exp(gref[None, :] - gc)
            dq += tl.dot(da, k * e_k, input_precision=PRECISE) * e_q
            dk += tl.dot(tl.trans(da), q * e_q, input_precision=PRECISE) * e_k
        else:  # exact, one row r of the chunk at a time: every exponent <= 0
            cols = k0 + tl.arange(0, KS)
            for r in range(BT):
                row_ok = cols < tl.where(t0 + r < T, KD, 0)  # row r exists
                q_r = tl.load(Q + head_k + (t0 + r) * H * KD + cols, mask=row_ok, other=0.0).to(tl.float32)
                k_r = tl.load(K + head_k + (t0 + r) * H * KD + cols, mask=row_ok, other=0.0).to(tl.float32)
                gc_r = _gc_row(GC + head_gc, t0 + r, H, KD, KS, k0)
                da_col = tl.sum(tl.where(idx[None, :] == r, da, 0.0), 1)  # dA[:, r]
                da_row = tl.sum(tl.where(idx[:, None] == r, da, 0.0), 0)  # dA[r, :]
                dq += da_col[:, None] * k_r[None, :] * \
                    tl.exp(tl.where(idx[:, None] >= r, gc - gc_r[None, :], float("-inf")))
                dk += da_row[:, None] * q_r[None, :] * \
                    tl.exp(tl.where(idx[:, None] <= r, gc_r[None, :] - gc, float("-inf")))
        # dg_t = sum_{s >= t} (q dq - k dk)_s: inside the chunk a reverse cumsum, plus what the later chunks add,
        # sum_v h_{n+1} * dh_n (CARRY: one part per value tile of the reverse walk). No sum over the whole
        # sequence, so no cancellation that grows with T.
        cols = k0 + tl.arange(0, KS)
        after = tl.zeros([KS], dtype=tl.float32)
        for i_v in range(n_carry):
            after += tl.load(CARRY + ((bh * n_carry + i_v) * NT + i_n) * KD + cols, mask=cols < KD, other=0.0)
        dg = tl.cumsum(q * dq - k * dk, 0, reverse=True) + after[None, :]
        _store_rows(DQ + head_k, dq, t0, T, H, KD, BT, KS, k0)
        _store_rows(DK + head_k, dk, t0, T, H, KD, BT, KS, k0)
        _store_rows(DG + head_k, dg, t0, T, H, KD, BT, KS, k0)


# warps / pipeline stages per kernel: the fastest of `benchmarks/tune_linear.py` on an H200 (Triton 3.6, B 4, T 4096,
# H 16, K = V = 128, bf16; fwd+bwd 2.91 -> 2.01 ms with walk_tiles below, 2026-11-28); (name, path) for the kernels
# compiled once per intra-chunk path
LAUNCH = {
    "cumsum": dict(num_warps=4, num_stages=1),
    ("intra", 1): dict(num_warps=4, num_stages=1),
    ("intra", 0): dict(num_warps=8, num_stages=1),  # [BT, K] fp32 q and gc whole
    "states": dict(num_warps=4, num_stages=1),
    "output": dict(num_warps=4, num_stages=2),
    "dstates": dict(num_warps=4, num_stages=2),
    "dv": dict(num_warps=4, num_stages=2),
    ("dqk", 1): dict(num_warps=4, num_stages=1),  # ptxas reports a 76 B spill, yet it times faster than 8 warps
    ("dqk", 0): dict(num_warps=8, num_stages=1),
}


# A chunk whose cumulative log-decay stays within this of its middle row's (every key column) forms its
# intra-chunk matrix, and the backward its intra-chunk gradients, as one product through the middle row:
# factors within exp(+-60) ~ 1e26 stay finite in fp32 and bf16 with room for the sums. The dash candidate's
# gates (logsigmoid / 16) always qualify; stronger decays take the exact element-wise path (all exponents <= 0).
ONE_PRODUCT_SPAN = 60.0


def key_slice(bt: int) -> int:
    """Key columns per slice of the intra-chunk kernels (16 under the interpreter's 16-token chunks, so that its
    tests cross slices)."""
    return 16 if bt < 64 else 32


def value_tiles(value_dim: int, width: int) -> list:
    """(first column, tile width, tiles) of the launches that cover V value columns: whole tiles of ``width``,
    then one narrower tail tile (at least 16 wide). The search's candidate carries V = D + 1 columns (a column of
    ones for its normaliser): 129 columns as 2 tiles of 64 and one of 16, not 3 of 64."""
    whole, tail = value_split(value_dim, width)
    return ([(0, width, whole // width)] if whole else []) + ([(whole, tail, 1)] if tail else [])


def value_split(value_dim: int, width: int) -> tuple:
    """(columns in whole tiles of ``width``, width of the tail tile or 0)."""
    whole = (value_dim // width) * width
    return whole, (_block(value_dim - whole) if value_dim > whole else 0)


def walk_tiles(key_dim: int, value_dim: int) -> tuple:
    """State tile [BK, BV] of the sequential walks: small, so that B * H * (K / BK) * (V / BV) programs fill the
    GPU (each walk is a chain of dependent steps; at B 4, H 16, K = V = 128 this gives 256 programs, not 64).
    64 x 64 timed fastest on an H200 (tune_linear, against 32 x 32, 64 x 32, 32 x 64 and 128 x 32)."""
    return min(_block(key_dim), 64), min(_block(value_dim), 64)


def _precise(prec: str) -> str:
    """Products of the one-product intra-chunk path: near-fp32 (3 tf32 products) unless already exact."""
    return "ieee" if prec == "ieee" else "tf32x3"


def chunk_size(interpreting: bool) -> int:
    return 16 if interpreting else 64


def _snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    # A and the per-chunk state snapshots in bf16 for bf16 inputs: every use rounds them to bf16 anyway (dot
    # operands), and dg's carry (sum_v h * dh) sums 64-row chunks, not the whole sequence. fp16 inputs keep
    # fp32: a state summed over thousands of steps can pass fp16's 65504
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def gla_cumsum(g, bt):
    """The padded chunk-local cumulative decay [B, N * BT, H, K] (fp32) and the per-chunk path flags."""
    batch, seq, heads, key_dim = g.shape
    nt = triton.cdiv(seq, bt)
    gc = torch.empty(batch, nt * bt, heads, key_dim, device=g.device, dtype=torch.float32)
    one_product = torch.empty(batch * heads, nt, device=g.device, dtype=torch.int8)
    _gla_cumsum_kernel[(nt, batch * heads)](g, gc, one_product, seq, nt * bt, heads, KD=key_dim, BT=bt,
                                            KS=min(_block(key_dim), key_slice(bt)), SAFE_SPAN=ONE_PRODUCT_SPAN,
                                            **LAUNCH["cumsum"])
    return gc, one_product


def gla_chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, bt):
    """q, k, g [B, T, H, K] and v [B, T, H, V], contiguous. Returns o, final state, and what backward needs
    (A, the state snapshots) and the per-chunk path flags."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), min(_block(value_dim), 64)
    ks = min(bk, key_slice(bt))
    dev = q.device
    snapshot = _snapshot_dtype(q.dtype)
    gc, one_product = gla_cumsum(g, bt)
    a = torch.empty(batch, heads, nt, bt, bt, device=dev, dtype=snapshot)
    hs = torch.empty(batch, heads, nt, key_dim, value_dim, device=dev, dtype=snapshot)
    final = torch.empty(batch, heads, key_dim, value_dim, device=dev, dtype=torch.float32) \
        if output_final_state else a  # never written
    o = torch.empty(batch, seq, heads, value_dim, device=dev, dtype=q.dtype)
    prec = _precision(q.dtype)
    for path in (1, 0):
        _gla_intra_kernel[(nt, batch * heads)](q, k, gc, a, one_product, seq, nt * bt, heads, KD=key_dim, BK=bk,
                                               BT=bt, KS=ks, PATH=path, PRECISE=_precise(prec),
                                               **LAUNCH[("intra", path)])
    h0 = initial_state.contiguous() if initial_state is not None else hs
    bkw, bvw = walk_tiles(key_dim, value_dim)
    for v0, width, count in value_tiles(value_dim, bvw):
        _gla_states_kernel[(triton.cdiv(key_dim, bkw) * count, batch * heads)](
            k, v, gc, h0, hs, final, seq, nt * bt, heads, nt, v0, KD=key_dim, VD=value_dim, BK=bkw, BV=width,
            BT=bt, HAS_H0=initial_state is not None, STORE_HT=output_final_state, DOT_PRECISION=prec,
            **LAUNCH["states"])
    for v0, width, count in value_tiles(value_dim, bv):
        _gla_output_kernel[(count, nt, batch * heads)](
            q, v, gc, a, hs, o, seq, nt * bt, heads, nt, v0, scale, KD=key_dim, VD=value_dim, BK=bk, BV=width,
            BT=bt, DOT_PRECISION=prec, **LAUNCH["output"])
    return o, (final if output_final_state else None), a, hs, one_product


def gla_chunk_bwd(q, k, v, g, do, a, hs, scale, initial_state, final_state, d_final, bt):
    """Gradients of q, k, v, g in their dtypes, and of the initial state (fp32). The cumulative decay is formed
    again (one light kernel) rather than kept: it is twice g's bytes, for every layer of a search."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), min(_block(value_dim), 64)
    ks = min(bk, key_slice(bt))
    dev = q.device
    prec = _precision(q.dtype)
    do = do.contiguous()
    gc, one_product = gla_cumsum(g, bt)
    dhs = torch.empty(hs.shape, device=dev, dtype=hs.dtype)  # likewise: the dots take it in the inputs' dtype
    dh0 = torch.empty(batch, heads, key_dim, value_dim, device=dev, dtype=torch.float32) \
        if initial_state is not None else dhs
    dht = d_final.contiguous() if d_final is not None else dhs
    bkw, bvw = walk_tiles(key_dim, value_dim)
    walk = value_tiles(value_dim, bvw)
    nvw = sum(count for _, _, count in walk)
    carry = torch.empty(batch * heads, nvw, nt, key_dim, device=dev, dtype=torch.float32)
    tile0 = 0
    for v0, width, count in walk:
        _gla_dstates_kernel[(triton.cdiv(key_dim, bkw) * count, batch * heads)](
            q, gc, do, hs, dht, dhs, dh0, carry, seq, nt * bt, heads, nt, v0, tile0, nvw, scale, KD=key_dim,
            VD=value_dim, BK=bkw, BV=width, BT=bt, HAS_DHT=d_final is not None,
            STORE_DH0=initial_state is not None, DOT_PRECISION=prec, **LAUNCH["dstates"])
        tile0 += count
    if d_final is not None:  # the final state's gradient reaches every decay of the last chunk
        carry[:, 0, -1] += (d_final.float() * final_state).sum(-1).view(batch * heads, key_dim)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    dv = torch.empty_like(v)
    tiles = value_tiles(value_dim, bv)
    for v0, width, count in tiles:
        _gla_bwd_dv_kernel[(count, nt, batch * heads)](
            k, gc, a, dhs, do, dv, seq, nt * bt, heads, nt, v0, scale, KD=key_dim, VD=value_dim, BK=bk, BV=width,
            BT=bt, KS=ks, DOT_PRECISION=prec, **LAUNCH["dv"])
    v_whole, tail = value_split(value_dim, bv)
    for path in (1, 0):
        _gla_bwd_dqk_kernel[(triton.cdiv(key_dim, ks), nt, batch * heads)](
            q, k, v, gc, hs, dhs, do, dq, dk, dg, one_product, carry, nvw, seq, nt * bt, heads, nt, scale,
            KD=key_dim, VD=value_dim, BV=bv, BT=bt, KS=ks, V_WHOLE=v_whole, BV_TAIL=tail, PATH=path,
            DOT_PRECISION=prec, PRECISE=_precise(prec), **LAUNCH[("dqk", path)])
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


class GLAChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, interpreting):
        bt = chunk_size(interpreting)
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        o, final, a, hs, _ = gla_chunk_fwd(q, k, v, g, scale, initial_state, output_final_state, bt)
        ctx.save_for_backward(q, k, v, g, a, hs, initial_state, final)
        ctx.scale, ctx.bt = scale, bt
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, a, hs, initial_state, final = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, dg, dh0 = gla_chunk_bwd(q, k, v, g, do, a, hs, ctx.scale, initial_state, final, d_final,
                                            ctx.bt)
        return dq, dk, dv, dg, None, None if dh0 is None else dh0.to(initial_state.dtype), None, None
