"""Gated delta rule, chunked, in plain PyTorch (the reference backend; the form the kernels follow).

Inside a chunk entered with state S_0, with gamma_i = exp(sum_{s<=i} g_s) over the chunk's positions, the
recurrence unrolls to S_i = gamma_i S_0 + sum_{j<=i} (gamma_i / gamma_j) k_j u_j^T, where the "new values"
u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) solve a unit lower-triangular system (the WY / UT form):
  (I + A) U = diag(beta) V - diag(beta gamma) K S_0,   A_ij = beta_i (gamma_i / gamma_j) k_i.k_j  (j < i)
so U = U0 - W S_0 with U0 = (I + A)^-1 beta V and W = (I + A)^-1 (beta gamma) K, computed for all chunks at
once; only S is carried from chunk to chunk:
  o_i = scale (gamma_i S_0^T q_i + sum_{j<=i} (gamma_i / gamma_j) (q_i.k_j) u_j)
  S_C = gamma_C S_0 + sum_j (gamma_C / gamma_j) k_j u_j^T
Ratios gamma_i / gamma_j (j <= i) are exponentials of differences <= 0: nothing overflows.
"""
from __future__ import annotations

from typing import Optional

import torch


def gated_delta_chunked(q, k, v, g, beta, scale: Optional[float] = None,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        chunk_size: int = 32):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim ** -0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (t.to(compute) for t in (q, k, v, g, beta))
    pad = (-seq) % chunk_size
    if pad:  # zero keys, beta and log-decay: the state passes through unchanged
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n, c = q.shape[1] // chunk_size, chunk_size

    def chunks(t):  # [B, T, H, ...] -> [B, H, N, C, ...]
        t = t.reshape(batch, n, c, heads, *t.shape[3:])
        return t.permute(0, 3, 1, 2, *range(4, t.dim()))

    qc, kc, vc, gc, bc = chunks(q) * scale, chunks(k), chunks(v), chunks(g), chunks(beta)
    log_gamma = gc.cumsum(-1)  # [B, H, N, C]
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    ratio = (log_gamma[..., :, None] - log_gamma[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kk = kc @ kc.transpose(-1, -2)
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    a = (bc[..., None] * ratio * kk).masked_fill(~strict, 0.0)
    eye = torch.eye(c, dtype=compute, device=q.device)
    rhs = torch.cat([bc[..., None] * vc, (bc * log_gamma.exp())[..., None] * kc], -1)
    solved = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u0, w = solved[..., :value_dim], solved[..., value_dim:]
    qk = (qc @ kc.transpose(-1, -2)) * ratio  # zero above the diagonal (ratio = 0 there)
    gamma = log_gamma.exp()[..., None]  # [B, H, N, C, 1]
    to_end = (log_gamma[..., -1:] - log_gamma).exp()[..., None]  # gamma_C / gamma_j
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(compute)
    out = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ state
        out.append((qc[:, :, i] * gamma[:, :, i]) @ state + qk[:, :, i] @ u)
        state = state * gamma[:, :, i, -1:, :] + (kc[:, :, i] * to_end[:, :, i]).transpose(-1, -2) @ u
    o = torch.stack(out, 2).permute(0, 2, 3, 1, 4).reshape(batch, n * c, heads, value_dim)[:, :seq].to(dtype)
    return o, (state if output_final_state else None)
