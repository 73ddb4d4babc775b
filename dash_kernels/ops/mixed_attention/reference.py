"""Plain PyTorch reference for the fused mixed attention (any device, any float dtype).

Used as the CPU backend and as the yardstick for every kernel. Memory is
O(B * H * T^2): fine for tests and CPU inference, not for long GPU sequences.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .spec import candidate_mask, normalize_candidates


def mixed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    windows: Sequence[Optional[int]],
    sinks: Optional[Sequence[int]] = None,
    *,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """``Y = sum_c w_c * softmax_c(q k^T * scale) v`` with candidate c's causal mask.

    ``upcast=True`` computes in float32 (float64 stays float64) and returns q's
    dtype; ``upcast=False`` computes in the input dtype (the "plain low-precision
    implementation" that kernel error is judged against).
    """
    windows, sinks = normalize_candidates(windows, sinks)
    batch, seq, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    compute = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        compute = torch.float32

    # [B, H, T, D]; GQA by repeating K/V heads (fine for a reference)
    qh = q.to(compute).transpose(1, 2)
    kh = k.to(compute).transpose(1, 2).repeat_interleave(heads_q // heads_kv, dim=1)
    vh = v.to(compute).transpose(1, 2).repeat_interleave(heads_q // heads_kv, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale

    w = weights.to(compute)
    w = w.expand(heads_q, -1) if w.dim() == 1 else w  # [Hq, C]
    pos = torch.arange(seq, device=q.device)
    t_idx, j_idx = pos[:, None], pos[None, :]

    out = torch.zeros_like(qh)
    for c, (window, sink) in enumerate(zip(windows, sinks)):
        mask = candidate_mask(t_idx, j_idx, window, sink)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = out + w[:, c].view(1, heads_q, 1, 1) * torch.matmul(probs, vh)
    return out.transpose(1, 2).to(q.dtype)
