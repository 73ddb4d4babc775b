"""Gated delta rule in Triton, chunked WY form (forward and backward); the math is chunk.py's.

Per (batch, head) and chunk of BT tokens, with gc = cumulative log-decay in the chunk, gamma = exp(gc), gC its
last row, R_ij = exp(gc_i - gc_j) (j <= i, else 0), L = I + A with A_ij = beta_i R_ij k_i.k_j (j < i):
  prep      Tinv = L^-1 (blockwise, see _unit_lower_inverse), W = Tinv ((beta gamma) * K),
            U0 = Tinv (beta * V)                                                       once per chunk
  forward   U = U0 - W S,  S <- gC S + (K * gC / gamma)^T U            sequential over chunks, per value tile
  output    O = scale ((Q * gamma) S + (Q K^T * R) U)                              per chunk, in parallel
  backward  first, per (chunk, value tile) in parallel, the state-free part of dU: scale (Q K^T * R)^T dO;
            then reverse over chunks per value tile, carrying dS (the walk stores each chunk's dS' and dU):
            dU += (K * gC / gamma) dS',  dS = scale (Q * gamma)^T dO + gC dS' - W^T dU;
            then per (chunk, value tile), in parallel,
            dV = beta * Tinv^T dU; partial sums over the value tile of dM = scale dO U^T, scale dO S^T, U dS'^T,
            dW = -dU S^T, (Tinv^T dU) . V, -(Tinv^T dU) U0^T, <dS', S>; then per chunk the rest through Tinv,
            A, R and gamma, and dg as the in-chunk reverse cumulative sum of d(gc).
Every exponent is a difference gc_i - gc_j with j <= i: never positive.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_tiles import block as _block
from ..linear_tiles import dot_precision as _precision
from ..linear_tiles import load_rows as _rows
from ..linear_tiles import mm as _mm
from ..linear_tiles import state_tile
from ..linear_tiles import store_rows as _put_rows


@triton.jit
def _vec(ptr, t0, T, H, BT: tl.constexpr):
    """Entries [t0, t0 + BT) of one head of a contiguous [B, T, H] tensor (fp32, zeros outside)."""
    rows = t0 + tl.arange(0, BT)
    return tl.load(ptr + rows * H, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def _decays(G, t0, T, H, BT: tl.constexpr):
    """gc (in-chunk cumulative log-decay), gamma, R (lower, exp(gc_i - gc_j)) and the last row's gc."""
    idx = tl.arange(0, BT)
    gc = tl.cumsum(_vec(G, t0, T, H, BT), 0)
    lower = idx[:, None] >= idx[None, :]
    r = tl.exp(tl.where(lower, gc[:, None] - gc[None, :], float("-inf")))
    g_last = tl.sum(tl.where(idx == BT - 1, gc, 0.0), 0)
    return gc, tl.exp(gc), r, g_last


@triton.jit
def _gdn_prep_kernel(K, V, G, BETA, TINV, W, U, T, H, KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, BT: tl.constexpr, DOT_PRECISION: tl.constexpr, INV_PRECISION: tl.constexpr,
                     INV_BLOCKS: tl.constexpr):
    """Per chunk: Tinv = (I + A)^-1, W = Tinv ((beta gamma) K) and U0 = Tinv (beta V) (all value columns)."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    k = _rows(K + b * T * H * KD + h * KD, t0, T, H, KD, BT, BK)
    beta = _vec(BETA + b * T * H + h, t0, T, H, BT)
    gc, gamma, r, g_last = _decays(G + b * T * H + h, t0, T, H, BT)
    idx = tl.arange(0, BT)
    kk = _mm(k, tl.trans(k), K.dtype.element_ty, DOT_PRECISION)  # exact operands: 16-bit products are exact
    a = tl.where(idx[:, None] > idx[None, :], beta[:, None] * r * kk, 0.0)
    tinv = _unit_lower_inverse(a, BT, INV_PRECISION, INV_BLOCKS)
    w = tl.dot(tinv, k * (beta * gamma)[:, None], input_precision=DOT_PRECISION)
    chunk = bh * tl.num_programs(0) + i_n
    tl.store(TINV + chunk * BT * BT + idx[:, None] * BT + idx[None, :], tinv)
    offs_k = tl.arange(0, BK)
    tl.store(W + chunk * BT * KD + idx[:, None] * KD + offs_k[None, :], w, mask=offs_k[None, :] < KD)
    head_v = b * T * H * VD + h * VD
    for v0 in range(0, VD, BV):  # U0 does not depend on the state: off the sequential walk
        v = _rows(V + head_v, t0, T, H, VD, BT, BV, v0)
        u0 = tl.dot(tinv, v * beta[:, None], input_precision=DOT_PRECISION)
        offs_v = v0 + tl.arange(0, BV)
        tl.store(U + chunk * BT * VD + idx[:, None] * VD + offs_v[None, :], u0, mask=offs_v[None, :] < VD)


@triton.jit
def _unit_lower_inverse(a, BT: tl.constexpr, PRECISION: tl.constexpr, NB: tl.constexpr):
    """(I + A)^-1 for strictly lower A [BT, BT], in NB (4 or 8) diagonal blocks of SUB = BT / NB rows: forward
    substitution inside every block at once (SUB - 1 steps, one product each: rows of in-block index i only
    read rows already final), then D^-1 with D = I + (A's block diagonal) and M = D^-1 (A's off-block part),
    strictly block-lower, so M^NB = 0: (I + A)^-1 = (I + M)^-1 D^-1 = (I - M)(I + M^2)[(I + M^4)] D^-1.
    NB 8 takes 7 + 6 products in a chain of about 12, against 15 + 4 for NB 4 (the substitution is the prep
    kernel's latency), but spills at K 128 (56 B a thread at 8 warps); INVERSE_BLOCKS picks. The growth stays
    in D^-1, which substitution forms exactly (a product formula on A itself, (I - A)(I + A^2)..., cancels
    terms of thousands when the keys are nearly parallel)."""
    SUB: tl.constexpr = BT // NB
    idx = tl.arange(0, BT)
    diag = idx[:, None] == idx[None, :]  # I - X is formed as where(diag, 1 - X, -X): no identity tile kept live
    same = (idx[:, None] // SUB) == (idx[None, :] // SUB)
    a_diag = tl.where(same, a, 0.0)
    dinv = tl.where(diag, 1.0, 0.0)
    for i in range(1, SUB):
        step = tl.dot(a_diag, dinv, input_precision=PRECISION)
        dinv = tl.where(((idx % SUB) == i)[:, None], tl.where(diag, 1.0 - step, -step), dinv)
    m = tl.dot(dinv, tl.where(same, 0.0, a), input_precision=PRECISION)
    m2 = tl.dot(m, m, input_precision=PRECISION)
    one_minus_m = tl.where(diag, 1.0 - m, -m)
    series = one_minus_m + tl.dot(one_minus_m, m2, input_precision=PRECISION)  # (I - M)(I + M^2)
    if NB == 8:
        m4 = tl.dot(m2, m2, input_precision=PRECISION)
        series = series + tl.dot(series, m4, input_precision=PRECISION)  # ... (I + M^4)
    return tl.dot(series, dinv, input_precision=PRECISION)


@triton.jit
def _load_chunk_mats(TINV, W, chunk, KD: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    idx = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    tinv = tl.load(TINV + chunk * BT * BT + idx[:, None] * BT + idx[None, :])
    w = tl.load(W + chunk * BT * KD + idx[:, None] * KD + offs_k[None, :], mask=offs_k[None, :] < KD, other=0.0)
    return tinv, w


@triton.jit
def _gdn_fwd_kernel(K, G, W, U, H0, HS, HT, T, H, NT,
                    KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The sequential walk for one value tile, as little as it can be: U = U0 - W S (in place over U0), the
    state entering each chunk (HS), S <- gC S + (K * gC / gamma)^T U. The outputs come after, in parallel."""
    i_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        s += tl.load(H0 + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head = b * T * H + h
    idx = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v[None, :] < VD
    for n in range(NT):
        t0 = n * BT
        chunk = bh * NT + n
        tl.store(HS + chunk * KD * VD + state_offs, s, mask=state_ok)
        k = _rows(K + head_k, t0, T, H, KD, BT, BK)
        gc = tl.cumsum(_vec(G + head, t0, T, H, BT), 0)
        g_last = tl.sum(tl.where(idx == BT - 1, gc, 0.0), 0)
        w = tl.load(W + chunk * BT * KD + idx[:, None] * KD + offs_k[None, :], mask=offs_k[None, :] < KD, other=0.0)
        u_ptrs = U + chunk * BT * VD + idx[:, None] * VD + offs_v[None, :]
        u = tl.load(u_ptrs, mask=v_ok, other=0.0) - tl.dot(w, s, input_precision=DOT_PRECISION)
        tl.store(u_ptrs, u, mask=v_ok)
        s = s * tl.exp(g_last) + tl.dot(tl.trans(k * tl.exp(g_last - gc)[:, None]), u,
                                        input_precision=DOT_PRECISION)
    if STORE_HT:
        tl.store(HT + bh * KD * VD + state_offs, s, mask=state_ok)


@triton.jit
def _gdn_output_kernel(Q, K, G, U, HS, O, T, H, NT, scale,
                       KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """O = scale ((Q * gamma) S + (Q K^T * R) U) for one (value tile, chunk)."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    chunk = bh * NT + i_n
    head_k = b * T * H * KD + h * KD
    q = _rows(Q + head_k, t0, T, H, KD, BT, BK)
    k = _rows(K + head_k, t0, T, H, KD, BT, BK)
    gc, gamma, r, g_last = _decays(G + b * T * H + h, t0, T, H, BT)
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    s = tl.load(HS + chunk * KD * VD + state_offs, mask=state_ok, other=0.0)
    idx = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    u = tl.load(U + chunk * BT * VD + idx[:, None] * VD + offs_v[None, :], mask=offs_v[None, :] < VD, other=0.0)
    m = _mm(q, tl.trans(k), K.dtype.element_ty, DOT_PRECISION) * r  # exact operands (the inputs)
    o = tl.dot(q * gamma[:, None], s, input_precision=DOT_PRECISION) + tl.dot(m, u, input_precision=DOT_PRECISION)
    _put_rows(O + b * T * H * VD + h * VD, o * scale, t0, T, H, VD, BT, BV, i_v * BV)


@triton.jit
def _gdn_bwd_local_kernel(Q, K, G, DO, DU, T, H, NT, scale,
                          KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """DU [B*H, NT, BT, V] (fp32) = scale M^T dO, M = (Q K^T) * R: the part of dU that does not depend on the
    state's gradient, per (value tile, chunk) in parallel, so that the reverse walk does not form it."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    t0 = n * BT
    head_k = b * T * H * KD + h * KD
    q = _rows(Q + head_k, t0, T, H, KD, BT, BK)
    k = _rows(K + head_k, t0, T, H, KD, BT, BK)
    do = _rows(DO + b * T * H * VD + h * VD, t0, T, H, VD, BT, BV, i_v * BV)
    r = _decays(G + b * T * H + h, t0, T, H, BT)[2]
    m = _mm(q, tl.trans(k), K.dtype.element_ty, DOT_PRECISION) * r  # exact operands (the inputs)
    idx = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    tl.store(DU + ((bh * NT + n) * BT + idx[:, None]) * VD + offs_v[None, :],
             tl.dot(tl.trans(m), do, input_precision=DOT_PRECISION) * scale, mask=offs_v[None, :] < VD)


@triton.jit
def _gdn_bwd_walk_kernel(Q, K, G, W, DO, DU, DHT, DS, DH0, T, H, NT, scale,
                         KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                         HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The reverse walk for one value tile, only the recurrence: dS (the gradient of the state leaving each chunk)
    into DS, dS <- gC dS + scale (Q * gamma)^T dO - W^T dU with dU = scale M^T dO (DU, formed in parallel
    before) + (K * gC / gamma) dS; the whole dU goes back into DU. Every other gradient comes per chunk, in
    parallel, from DS and DU (_gdn_bwd_partials_kernel)."""
    i_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        ds += tl.load(DHT + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    head_k = b * T * H * KD + h * KD
    head_v = b * T * H * VD + h * VD
    head = b * T * H + h
    idx = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    for i in range(NT):
        n = NT - 1 - i
        t0 = n * BT
        chunk = bh * NT + n
        tl.store(DS + chunk * KD * VD + state_offs, ds, mask=state_ok)
        q = _rows(Q + head_k, t0, T, H, KD, BT, BK)
        k = _rows(K + head_k, t0, T, H, KD, BT, BK)
        do = _rows(DO + head_v, t0, T, H, VD, BT, BV, i_v * BV)
        gc = tl.cumsum(_vec(G + head, t0, T, H, BT), 0)
        g_last = tl.sum(tl.where(idx == BT - 1, gc, 0.0), 0)
        w = tl.load(W + chunk * BT * KD + idx[:, None] * KD + offs_k[None, :], mask=offs_k[None, :] < KD, other=0.0)
        du_ptrs = DU + (chunk * BT + idx[:, None]) * VD + offs_v[None, :]
        du = tl.load(du_ptrs, mask=offs_v[None, :] < VD, other=0.0) + \
            tl.dot(k * tl.exp(g_last - gc)[:, None], ds, input_precision=DOT_PRECISION)
        tl.store(du_ptrs, du, mask=offs_v[None, :] < VD)
        ds = ds * tl.exp(g_last) + tl.dot(tl.trans(q * tl.exp(gc)[:, None]), do, input_precision=DOT_PRECISION) \
            * scale - tl.dot(tl.trans(w), du, input_precision=DOT_PRECISION)
    if STORE_DH0:
        tl.store(DH0 + bh * KD * VD + state_offs, ds, mask=state_ok)


@triton.jit
def _gdn_bwd_partials_kernel(V, G, BETA, TINV, W, HS, DS, DO, DU, DV,
                             P_DM, P_DQ, P_DK, P_DW, P_DB, P_DL, P_DGC,
                             T, H, NT, scale,
                             KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per (value tile, chunk): dV and this tile's partial sums (P_*, [NV, B*H, NT, ...]) from the state S
    entering the chunk (HS), the gradient dS' of the state leaving it (DS) and dU (DU, from the walk)."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2)
    nbh = tl.num_programs(2)
    b = bh // H
    h = bh % H
    t0 = n * BT
    chunk = bh * NT + n
    part = i_v * nbh * NT + chunk  # this tile's slot in the partial-sum buffers
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    head_v = b * T * H * VD + h * VD
    head = b * T * H + h
    idx = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mat_bt = idx[:, None] * BT + idx[None, :]
    mat_k = idx[:, None] * KD + offs_k[None, :]
    k_ok = offs_k[None, :] < KD
    s = tl.load(HS + chunk * KD * VD + state_offs, mask=state_ok, other=0.0)
    ds = tl.load(DS + chunk * KD * VD + state_offs, mask=state_ok, other=0.0)
    v = _rows(V + head_v, t0, T, H, VD, BT, BV, i_v * BV)
    do = _rows(DO + head_v, t0, T, H, VD, BT, BV, i_v * BV)
    beta = _vec(BETA + head, t0, T, H, BT)
    g_last = _decays(G + head, t0, T, H, BT)[3]
    tinv, w = _load_chunk_mats(TINV, W, chunk, KD, BK, BT)
    u0 = tl.dot(tinv, v * beta[:, None], input_precision=DOT_PRECISION)
    u = u0 - tl.dot(w, s, input_precision=DOT_PRECISION)
    du = tl.load(DU + (chunk * BT + idx[:, None]) * VD + offs_v[None, :], mask=offs_v[None, :] < VD, other=0.0)
    dbv = tl.dot(tl.trans(tinv), du, input_precision=DOT_PRECISION)  # d(beta * V)
    _put_rows(DV + head_v, dbv * beta[:, None], t0, T, H, VD, BT, BV, i_v * BV)
    tl.store(P_DM + part * BT * BT + mat_bt, tl.dot(do, tl.trans(u), input_precision=DOT_PRECISION) * scale)
    tl.store(P_DQ + part * BT * KD + mat_k, tl.dot(do, tl.trans(s), input_precision=DOT_PRECISION) * scale,
             mask=k_ok)
    tl.store(P_DK + part * BT * KD + mat_k, tl.dot(u, tl.trans(ds), input_precision=DOT_PRECISION), mask=k_ok)
    tl.store(P_DW + part * BT * KD + mat_k, -tl.dot(du, tl.trans(s), input_precision=DOT_PRECISION), mask=k_ok)
    tl.store(P_DB + part * BT + idx, tl.sum(dbv * v, 1))
    tl.store(P_DL + part * BT * BT + mat_bt, -tl.dot(dbv, tl.trans(u0), input_precision=DOT_PRECISION))
    tl.store(P_DGC + part, tl.sum(tl.sum(ds * s, 1), 0) * tl.exp(g_last))  # d(gc_last) via gC S


@triton.jit
def _sum_parts(P, chunk, k0, nbh, NT, KD: tl.constexpr, BT: tl.constexpr, KS: tl.constexpr, NV: tl.constexpr):
    """Columns [k0, k0 + KS) of one chunk's [BT, KD] partial sums, summed over the NV value tiles."""
    idx = tl.arange(0, BT)
    cols = k0 + tl.arange(0, KS)
    offs = idx[:, None] * KD + cols[None, :]
    ok = cols[None, :] < KD
    total = tl.zeros([BT, KS], dtype=tl.float32)
    for i_v in range(NV):
        total += tl.load(P + (i_v * nbh * NT + chunk) * BT * KD + offs, mask=ok, other=0.0)
    return total


@triton.jit
def _gdn_bwd_chunk_kernel(Q, K, G, BETA, TINV, W, P_DM, P_DQ, P_DK, P_DW, P_DB, P_DL, P_DGC,
                          DQ, DK, DBETA, DGC, T, H, NT,
                          KD: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, NV: tl.constexpr,
                          KS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per chunk: sum the value tiles' partials, then dq, dk, dbeta and d(gc) through Tinv, A, R, gamma.

    Two passes over slices of KS key columns keep only [BT, KS] tiles live (whole [BT, K] fp32 tiles spilled
    kilobytes of registers): the first forms what contracts over the keys (QK^T, KK^T, dL, row sums) and dq,
    the second dk, which needs dA from the whole first pass."""
    i_n = tl.program_id(0)
    bh = tl.program_id(1)
    nbh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    t0 = i_n * BT
    chunk = bh * NT + i_n
    head_k = b * T * H * KD + h * KD
    head = b * T * H + h
    idx = tl.arange(0, BT)
    mat_bt = idx[:, None] * BT + idx[None, :]
    dm = tl.zeros([BT, BT], dtype=tl.float32)
    dl = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    dgc_last = 0.0
    for i_v in tl.static_range(NV):
        part = i_v * nbh * NT + chunk
        dm += tl.load(P_DM + part * BT * BT + mat_bt)
        dl += tl.load(P_DL + part * BT * BT + mat_bt)
        dbeta += tl.load(P_DB + part * BT + idx)
        dgc_last += tl.load(P_DGC + part)
    beta = _vec(BETA + head, t0, T, H, BT)
    gc, gamma, r, g_last = _decays(G + head, t0, T, H, BT)
    tinv = tl.load(TINV + chunk * BT * BT + mat_bt)
    to_end = tl.exp(g_last - gc)
    dmr = dm * r  # output term M = QK^T * R
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    dgamma = tl.zeros([BT], dtype=tl.float32)
    d_to_end = tl.zeros([BT], dtype=tl.float32)
    dbk_k = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, BK, KS):  # a loop, not unrolled: unrolled slices' loads were hoisted together
        q = _rows(Q + head_k, t0, T, H, KD, BT, KS, k0)
        k = _rows(K + head_k, t0, T, H, KD, BT, KS, k0)
        qk += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (bf16 operands: ptxas spills more at D 64)
        kk += tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)
        dq_s = _sum_parts(P_DQ, chunk, k0, nbh, NT, KD, BT, KS, NV)  # through (Q * gamma) S
        _put_rows(DQ + head_k, tl.dot(dmr, k, input_precision=DOT_PRECISION) + dq_s * gamma[:, None],
                  t0, T, H, KD, BT, KS, k0)
        dgamma += tl.sum(q * dq_s, 1)
        d_to_end += tl.sum(k * _sum_parts(P_DK, chunk, k0, nbh, NT, KD, BT, KS, NV), 1)  # K * gC / gamma
        # W = Tinv ((beta gamma) K): d((beta gamma) K) = Tinv^T dW, and dTinv = dW W^T enters dL
        dbk = tl.dot(tl.trans(tinv), _sum_parts(P_DW, chunk, k0, nbh, NT, KD, BT, KS, NV),
                     input_precision=DOT_PRECISION)
        cols = k0 + tl.arange(0, KS)
        w = tl.load(W + chunk * BT * KD + idx[:, None] * KD + cols[None, :], mask=cols[None, :] < KD, other=0.0)
        dl += -tl.dot(dbk, tl.trans(w), input_precision=DOT_PRECISION)
        dbk_k += tl.sum(dbk * k, 1)
    rr = dmr * qk  # d(R) * R, its output-term part (dm, qk die here)
    da = tl.where(idx[:, None] > idx[None, :], dl, 0.0)  # through Tinv = (I + A)^-1 (dl holds dTinv-terms)
    dbeta += dbk_k * gamma
    dgamma += dbk_k * beta
    # A = beta_i R_ij kk_ij (strictly lower)
    da_r = da * r
    dbeta += tl.sum(da_r * kk, 1)
    dkk = da_r * beta[:, None]
    rr += dkk * kk  # and its A part: dA * beta * kk * R
    for k0 in range(0, BK, KS):  # a loop, not unrolled: unrolled slices' loads were hoisted together
        q = _rows(Q + head_k, t0, T, H, KD, BT, KS, k0)
        k = _rows(K + head_k, t0, T, H, KD, BT, KS, k0)
        dbk = tl.dot(tl.trans(tinv), _sum_parts(P_DW, chunk, k0, nbh, NT, KD, BT, KS, NV),
                     input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(dmr), q, input_precision=DOT_PRECISION) \
            + _sum_parts(P_DK, chunk, k0, nbh, NT, KD, BT, KS, NV) * to_end[:, None] \
            + dbk * (beta * gamma)[:, None] \
            + tl.dot(dkk, k, input_precision=DOT_PRECISION) + tl.dot(tl.trans(dkk), k, input_precision=DOT_PRECISION)
        _put_rows(DK + head_k, dk, t0, T, H, KD, BT, KS, k0)
    # d(gc): gamma = exp(gc), R_ij = exp(gc_i - gc_j), to_end_j = exp(gc_last - gc_j), and gC = exp(gc_last)
    dgc = gamma * dgamma + tl.sum(rr, 1) - tl.sum(rr, 0) - to_end * d_to_end
    dgc += tl.where(idx == BT - 1, dgc_last + tl.sum(to_end * d_to_end, 0), 0.0)
    rows = t0 + idx
    tl.store(DBETA + head + rows * H, dbeta, mask=rows < T)
    tl.store(DGC + chunk * BT + idx, dgc)


# diagonal blocks of the chunk inverse (_unit_lower_inverse): 4 measured (H200, 0.69 ms prep at B 4, T 4096,
# H 16, K 128); 8 shortens the chain by a third but spills, untimed (benchmarks/tune_linear.py times both)
INVERSE_BLOCKS = 4
PREP_WARPS = {4: 4, 8: 8}  # ptxas (K 128): 4 blocks at 4 warps spill nothing; 8 blocks at 8 warps 56 B (152 at 4)


def chunk_size(interpreting: bool) -> int:
    return 16 if interpreting else 64


def backward_key_slice(bt: int) -> int:
    """Key columns per slice of the per-chunk backward (16 under the interpreter's 16-token chunks, so that its
    tests cross slices). ptxas (sm_90a, K 128, 8 warps): 32 spills 288 B a thread, 64 spills 524 B, whole
    [64, 128] tiles spilled 5.2 KB."""
    return 16 if bt < 64 else 32


def walk_value_tile(value_dim: int) -> int:
    """Value columns per program of the forward walk: narrow, so that B * H * V / BV programs fill the GPU (the
    walk is a chain of dependent steps; the key rows cannot split: U = U0 - W S contracts over them)."""
    return min(_block(value_dim), 32)


def backward_value_tile(key_dim: int, value_dim: int) -> int:
    # the per-chunk partials kernel stages [BT, BT], [BT, K] and [BT, BV] operands in shared memory: at K = 128
    # a 64-wide value tile needs 272 KB (over Hopper's 227 KB), a 32-wide one 184 KB
    return min(_block(value_dim), 32 if key_dim > 64 else 64)


def gdn_chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, bt):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), min(_block(value_dim), 64)
    nv = triton.cdiv(value_dim, bv)
    dev, prec = q.device, _precision(q.dtype)
    # the inverse's products carry fp32 accuracy (three tf32 products each) wherever the rest runs tf32
    inv_prec = "ieee" if prec == "ieee" else "tf32x3"
    f32 = dict(device=dev, dtype=torch.float32)
    tinv = torch.empty(batch * heads, nt, bt, bt, **f32)
    w = torch.empty(batch * heads, nt, bt, key_dim, **f32)
    u = torch.empty(batch * heads, nt, bt, value_dim, **f32)
    _gdn_prep_kernel[(nt, batch * heads)](k, v, g, beta, tinv, w, u, seq, heads, KD=key_dim, VD=value_dim, BK=bk,
                                          BV=bv, BT=bt, DOT_PRECISION=prec, INV_PRECISION=inv_prec,
                                          INV_BLOCKS=INVERSE_BLOCKS, num_warps=PREP_WARPS[INVERSE_BLOCKS],
                                          num_stages=1)
    hs = torch.empty(batch * heads, nt, key_dim, value_dim, **f32)
    final = torch.empty(batch, heads, key_dim, value_dim, **f32) if output_final_state else hs  # never written
    h0 = initial_state.contiguous() if initial_state is not None else hs
    bvw = walk_value_tile(value_dim)
    _gdn_fwd_kernel[(triton.cdiv(value_dim, bvw), batch * heads)](
        k, g, w, u, h0, hs, final, seq, heads, nt, KD=key_dim, VD=value_dim, BK=bk, BV=bvw, BT=bt,
        HAS_H0=initial_state is not None, STORE_HT=output_final_state, DOT_PRECISION=prec, num_warps=4,
        num_stages=1)
    o = torch.empty(batch, seq, heads, value_dim, device=dev, dtype=q.dtype)
    _gdn_output_kernel[(nv, nt, batch * heads)](
        q, k, g, u, hs, o, seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bk, BV=bv, BT=bt,
        DOT_PRECISION=prec, num_warps=4, num_stages=1)
    return o, (final if output_final_state else None), tinv, w, hs


def gdn_chunk_bwd(q, k, v, g, beta, do, tinv, w, hs, scale, initial_state, d_final, bt):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    nt = triton.cdiv(seq, bt)
    bk, bv = _block(key_dim), backward_value_tile(key_dim, value_dim)
    nv = triton.cdiv(value_dim, bv)
    dev, prec = q.device, _precision(q.dtype)
    do = do.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)
    bh = batch * heads
    p_dm, p_dl = torch.empty(nv, bh, nt, bt, bt, **f32), torch.empty(nv, bh, nt, bt, bt, **f32)
    # the [BT, K] partials are the backward's largest traffic (at B 4, T 4096, H 16, K = V = 128: 4 value
    # tiles x 3 x 537 MB in fp32, written once and read up to twice): bf16 for bf16 inputs, whose gradients
    # come back in bf16 anyway
    partial = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    p_dq, p_dk, p_dw = (torch.empty(nv, bh, nt, bt, key_dim, device=dev, dtype=partial) for _ in range(3))
    p_db, p_dgc = torch.empty(nv, bh, nt, bt, **f32), torch.empty(nv, bh, nt, **f32)
    dv = torch.empty(v.shape, **f32)
    dh0 = torch.empty(batch, heads, key_dim, value_dim, **f32) if initial_state is not None else dv
    dht = d_final.contiguous() if d_final is not None else dv
    # the recurrence alone walks the chunks (narrow value tiles: more programs); the rest runs per chunk
    ds = torch.empty(hs.shape, **f32)
    du = torch.empty(bh, nt, bt, value_dim, **f32)
    bvl = min(_block(value_dim), 64)
    _gdn_bwd_local_kernel[(triton.cdiv(value_dim, bvl), nt, bh)](
        q, k, g, do, du, seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bk, BV=bvl, BT=bt,
        DOT_PRECISION=prec, num_warps=4, num_stages=1)
    bvw = walk_value_tile(value_dim)
    _gdn_bwd_walk_kernel[(triton.cdiv(value_dim, bvw), bh)](
        q, k, g, w, do, du, dht, ds, dh0, seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bk, BV=bvw, BT=bt,
        HAS_DHT=d_final is not None, STORE_DH0=initial_state is not None, DOT_PRECISION=prec, num_warps=8,
        num_stages=1)  # ptxas (K 128): 8 warps spill nothing (256 B before dU's state-free part moved out)
    _gdn_bwd_partials_kernel[(nv, nt, bh)](
        v, g, beta, tinv, w, hs, ds, do, du, dv, p_dm, p_dq, p_dk, p_dw, p_db, p_dl, p_dgc,
        seq, heads, nt, scale, KD=key_dim, VD=value_dim, BK=bk, BV=bv, BT=bt, DOT_PRECISION=prec,
        num_warps=8, num_stages=1)  # ptxas (K 128): 8 warps spill nothing
    dq, dk = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32)
    dbeta = torch.empty(beta.shape, **f32)
    dgc = torch.empty(bh, nt, bt, **f32)
    _gdn_bwd_chunk_kernel[(nt, bh)](
        q, k, g, beta, tinv, w, p_dm, p_dq, p_dk, p_dw, p_db, p_dl, p_dgc, dq, dk, dbeta, dgc, seq, heads, nt,
        KD=key_dim, BK=bk, BT=bt, NV=nv, KS=min(bk, backward_key_slice(bt)), DOT_PRECISION=prec, num_warps=8,
        num_stages=1)  # 8 warps: 6.4 -> 4.1 ms on the H200 (before the key slices)
    # gc_i = sum of g over the chunk's rows <= i: dg = reverse cumulative sum of d(gc) inside each chunk
    dg = dgc.flip(-1).cumsum(-1).flip(-1).view(batch, heads, nt * bt)[:, :, :seq].transpose(1, 2)
    return dq, dk, dv, dg, dbeta, (dh0 if initial_state is not None else None)


class GDNChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, interpreting):
        bt = chunk_size(interpreting)
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        o, final, tinv, w, hs = gdn_chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, bt)
        ctx.save_for_backward(q, k, v, g, beta, tinv, w, hs, initial_state)
        ctx.scale, ctx.bt = scale, bt
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, beta, tinv, w, hs, initial_state = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, dg, dbeta, dh0 = gdn_chunk_bwd(q, k, v, g, beta, do, tinv, w, hs, ctx.scale, initial_state,
                                                   d_final, ctx.bt)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype), None,
                None if dh0 is None else dh0.to(initial_state.dtype), None, None)
