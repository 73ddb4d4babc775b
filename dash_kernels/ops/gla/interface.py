"""The public op: ``dash_kernels.gated_linear_attention`` (flash-linear-attention compatible semantics)."""
from __future__ import annotations

from typing import Optional

import torch

from .chunk import gla_chunked

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                           scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                           output_final_state: bool = False, backend: str = "auto"):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``; returns ``(o, final_state)``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); initial_state: [B, H, K, V].
    fp32 state and accumulation; differentiable in every tensor input. Backends: "reference" (chunked
    PyTorch; what "auto" uses until the Triton kernels land).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: one device expected")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"k and g must match q's shape {tuple(q.shape)}, got k {tuple(k.shape)}, g {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (q.shape[0], q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {[q.shape[0], q.shape[2], q.shape[3], v.shape[3]]}, "
                         f"got {tuple(initial_state.shape)}")
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference' for gated_linear_attention (Triton kernels are not "
                         f"built yet), got {backend!r}")
    return gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
