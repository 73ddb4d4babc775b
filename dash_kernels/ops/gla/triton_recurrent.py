"""Gated linear attention in Triton, fused recurrent form (forward and backward).

Each program owns one (batch, head) and one tile of BV value channels, keeps the fp32 state tile
``S[:, tile]`` ([K, BV]) in registers and walks the sequence once:
  forward      S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t
  backward dq  the same walk again, dq_t = scale * S_t do_t (partial over the value tile)
  backward dk, dv   a reverse walk carrying dS_t = scale * q_t do_t^T + exp(g_{t+1}) * dS_{t+1}:
               dk_t = dS_t v_t (partial over the value tile), dv_t = dS_t^T k_t, dh0 = exp(g_0) * dS_0
  dg           no walk: g enters only through cumulative sums, so
               dg_s = sum_{t >= s} (q_t * dq_t - k_t * dk_t) + rowsum(dS_final * S_final)
Every exponent is a log-decay <= 0: nothing overflows. The state rows are independent, so splitting the
value channels across programs needs no communication; dq and dk are summed over the value tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_tiles import block as _block
from ..linear_tiles import state_tile


@triton.jit
def _gla_fwd_kernel(
    Q, K, V, G, O, H0, HT,
    stride_b, stride_t, stride_h, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, H, scale,
    KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < KD
    v_ok = offs_v < VD
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    state_offs += bh * KD * VD
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    qk_row = b * stride_b + h * stride_h + offs_k
    v_row = b * stride_vb + h * stride_vh + offs_v
    o_row = b * stride_ob + h * stride_oh + offs_v
    for t in range(T):
        q = tl.load(Q + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(G + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + v_row + t * stride_vt, mask=v_ok, other=0.0).to(tl.float32)
        state = state * tl.exp(g)[:, None] + k[:, None] * v[None, :]
        o = tl.sum(state * q[:, None], 0) * scale
        tl.store(O + o_row + t * stride_ot, o.to(O.dtype.element_ty), mask=v_ok)
    if STORE_HT:
        tl.store(HT + state_offs, state, mask=state_ok)


@triton.jit
def _gla_bwd_dq_kernel(
    K, V, G, DO, H0, DQ,
    stride_b, stride_t, stride_h, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_dqv, T, H, scale,
    KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
):
    """dq partial over this value tile (fp32, [NV, B, T, H, K] contiguous)."""
    i_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < KD
    v_ok = offs_v < VD
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
        state += tl.load(H0 + bh * KD * VD + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    qk_row = b * stride_b + h * stride_h + offs_k
    v_row = b * stride_vb + h * stride_vh + offs_v
    do_row = b * stride_ob + h * stride_oh + offs_v
    dq_row = i_v * stride_dqv + (b * T * H + h) * KD + offs_k
    for t in range(T):
        k = tl.load(K + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(G + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + v_row + t * stride_vt, mask=v_ok, other=0.0).to(tl.float32)
        do = tl.load(DO + do_row + t * stride_ot, mask=v_ok, other=0.0).to(tl.float32)
        state = state * tl.exp(g)[:, None] + k[:, None] * v[None, :]
        dq = tl.sum(state * do[None, :], 1) * scale
        tl.store(DQ + dq_row + t * H * KD, dq, mask=k_ok)


@triton.jit
def _gla_bwd_dkdv_kernel(
    Q, K, V, G, DO, DHT, DK, DV, DH0,
    stride_b, stride_t, stride_h, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_dkv, T, H, scale,
    KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse walk: dk partial over this value tile (fp32 [NV, B, T, H, K]), dv (fp32 [B, T, H, V]), dh0."""
    i_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < KD
    v_ok = offs_v < VD
    state_offs, state_ok = state_tile(i_v * BV, KD, VD, BK, BV)
    state_offs += bh * KD * VD
    # carried: exp(g_{t+1}) * dS_{t+1}, starting from the final state's gradient
    carried = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        carried += tl.load(DHT + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    qk_row = b * stride_b + h * stride_h + offs_k
    v_row = b * stride_vb + h * stride_vh + offs_v
    do_row = b * stride_ob + h * stride_oh + offs_v
    dk_row = i_v * stride_dkv + (b * T * H + h) * KD + offs_k
    dv_row = (b * T * H + h) * VD + offs_v
    for i in range(T):
        t = T - 1 - i
        q = tl.load(Q + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(G + qk_row + t * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + v_row + t * stride_vt, mask=v_ok, other=0.0).to(tl.float32)
        do = tl.load(DO + do_row + t * stride_ot, mask=v_ok, other=0.0).to(tl.float32)
        ds = carried + (q * scale)[:, None] * do[None, :]
        tl.store(DK + dk_row + t * H * KD, tl.sum(ds * v[None, :], 1), mask=k_ok)
        tl.store(DV + dv_row + t * H * VD, tl.sum(ds * k[:, None], 0), mask=v_ok)
        carried = ds * tl.exp(g)[:, None]
    if STORE_DH0:
        tl.store(DH0 + state_offs, carried, mask=state_ok)


def _value_tile(key_dim: int, value_dim: int) -> int:
    # the [K, BV] fp32 state lives in registers: keep it at <= 8K elements per program
    return max(16, min(_block(value_dim), 8192 // _block(key_dim), 64))


def _strides(q, v):
    # q, k and g share a layout in the launchers below (made so by the caller)
    return (*q.stride()[:3], *v.stride()[:3])


def gla_recurrent_fwd(q, k, v, g, scale, initial_state, output_final_state):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    o = torch.empty(batch, seq, heads, value_dim, device=q.device, dtype=q.dtype)
    final = torch.empty(batch, heads, key_dim, value_dim, device=q.device, dtype=torch.float32) \
        if output_final_state else o
    bv = _value_tile(key_dim, value_dim)
    grid = (triton.cdiv(value_dim, bv), batch * heads)
    h0 = initial_state.contiguous() if initial_state is not None else o
    _gla_fwd_kernel[grid](
        q, k, v, g, o, h0, final, *_strides(q, v), *o.stride()[:3], seq, heads, scale,
        KD=key_dim, VD=value_dim, BK=_block(key_dim), BV=bv,
        HAS_H0=initial_state is not None, STORE_HT=output_final_state, num_warps=4, num_stages=2,
    )
    return o, (final if output_final_state else None)


def gla_recurrent_bwd(q, k, v, g, do, scale, initial_state, final_state, d_final):
    """Returns dq, dk, dv, dg (fp32), dh0 (fp32 or None)."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    bv = _value_tile(key_dim, value_dim)
    nv = triton.cdiv(value_dim, bv)
    grid = (nv, batch * heads)
    do = do.contiguous()
    dq = torch.empty(nv, batch, seq, heads, key_dim, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty(batch, seq, heads, value_dim, device=q.device, dtype=torch.float32)
    dh0 = torch.empty(batch, heads, key_dim, value_dim, device=q.device, dtype=torch.float32) \
        if initial_state is not None else dv
    h0 = initial_state.contiguous() if initial_state is not None else dv
    dht = d_final.contiguous() if d_final is not None else dv
    common = dict(KD=key_dim, VD=value_dim, BK=_block(key_dim), BV=bv, num_warps=4, num_stages=2)
    _gla_bwd_dq_kernel[grid](
        k, v, g, do, h0, dq, *_strides(q, v), *do.stride()[:3], dq.stride(0), seq, heads, scale,
        HAS_H0=initial_state is not None, **common,
    )
    _gla_bwd_dkdv_kernel[grid](
        q, k, v, g, do, dht, dk, dv, dh0, *_strides(q, v), *do.stride()[:3], dk.stride(0), seq, heads, scale,
        HAS_DHT=d_final is not None, STORE_DH0=initial_state is not None, **common,
    )
    dq, dk = dq.sum(0), dk.sum(0)
    # g enters only through its prefix sums: reverse cumulative sum of q*dq - k*dk, plus the final state's term
    dg = (q.float() * dq - k.float() * dk).flip(1).cumsum(1).flip(1)
    if d_final is not None:
        dg = dg + (d_final.float() * final_state).sum(-1)[:, None]  # [B, 1, H, K]
    return dq, dk, dv, dg, (dh0 if initial_state is not None else None)


class GLARecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state):
        # the kernels read q, k and g with one set of strides and unit channel stride
        if not (q.stride(-1) == 1 and k.stride() == q.stride() and g.stride() == q.stride()):
            q, k, g = q.contiguous(), k.contiguous(), g.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        o, final = gla_recurrent_fwd(q, k, v, g, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, initial_state, final)
        ctx.scale = scale
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, initial_state, final = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, dg, dh0 = gla_recurrent_bwd(q, k, v, g, do, ctx.scale, initial_state, final, d_final)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), None,
                None if dh0 is None else dh0.to(initial_state.dtype), None)
