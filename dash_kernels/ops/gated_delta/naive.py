"""Gated delta rule, step by step (the definition; slow, for tests).

State ``S`` [B, H, K, V]: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
``o_t = scale * S_t^T q_t``.
"""
from __future__ import annotations

from typing import Optional

import torch


def gated_delta_recurrent(q, k, v, g, beta, scale: Optional[float] = None,
                          initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False):
    batch, seq, heads, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 state, fp64 for checks
    q, k, v, g, beta = (t.to(compute) for t in (q, k, v, g, beta))
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(compute)
    out = []
    for t in range(seq):
        decayed = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]  # [B, H, K]
        # S_t = decayed + k (beta (v - decayed^T k))^T
        new_value = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", decayed, k_t))
        state = decayed + k_t[..., None] * new_value[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    o = torch.stack(out, 1).to(dtype)
    return o, (state if output_final_state else None)
