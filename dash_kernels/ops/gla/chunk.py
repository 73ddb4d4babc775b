"""Gated linear attention, chunked, in plain PyTorch (the reference backend until Triton kernels land).

Within a chunk of length C, with cumulative log-decay ``b_i = sum_{s<=i} g_s`` (per key channel):
  intra-chunk  o_i += sum_{j<=i} (sum_k q_ik k_jk exp(b_ik - b_jk)) v_j
  inter-chunk  o_i += (q_i * exp(b_i)) S
  state        S    = exp(b_C) * S + sum_j (k_j * exp(b_C - b_j)) v_j^T
Every exponent is <= 0 (g <= 0), so nothing overflows for any gate values; the intra-chunk term
materialises [C, C, K] per chunk, which is why C is small.
"""
from __future__ import annotations

from typing import Optional

import torch


def gla_chunked(q, k, v, g, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, chunk_size: int = 16):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 state, fp64 for checks
    q, k, v, g = (t.to(compute) for t in (q, k, v, g))
    pad = (-seq) % chunk_size
    if pad:  # zero keys/values and zero log-decay leave outputs and the state unchanged
        q, k, v, g = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
    n = q.shape[1] // chunk_size

    def chunks(t):  # [B, T, H, X] -> [B, H, N, C, X]
        return t.view(batch, n, chunk_size, heads, t.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc, gc = chunks(q) * scale, chunks(k), chunks(v), chunks(g)
    b = gc.cumsum(3)  # [B, H, N, C, K]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()
    scores = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, decay)
    out = torch.einsum("bhnij,bhnjv->bhniv", scores, vc)
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(compute)
    inter = []
    b_last = b[..., -1:, :]  # [B, H, N, 1, K]
    k_to_end = kc * (b_last - b).exp()
    for i in range(n):
        inter.append(torch.einsum("bhck,bhkv->bhcv", qc[:, :, i] * b[:, :, i].exp(), state))
        state = state * b_last[:, :, i, 0, :, None].exp() + torch.einsum("bhck,bhcv->bhkv", k_to_end[:, :, i], vc[:, :, i])
    out = out + torch.stack(inter, 2)
    o = out.permute(0, 2, 3, 1, 4).reshape(batch, n * chunk_size, heads, value_dim)[:, :seq].to(dtype)
    return o, (state if output_final_state else None)
