"""The public op: ``dash_kernels.gated_delta_rule`` (flash-linear-attention compatible semantics)."""
from __future__ import annotations

from typing import Optional

import torch

from ..gla.interface import _FLOAT, _pick_backend, _validate
from .chunk import gated_delta_chunked


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False, backend: str = "auto", check_decay: bool = True):
    """``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    q, k: [B, T, H, K] (keys normalised by the caller); v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0);
    beta: [B, T, H], usually in [0, 1] (values outside are computed as given: the state may then grow);
    initial_state: [B, H, K, V]. scale defaults to ``K ** -0.5``. fp32 state and accumulation; returns
    ``(o, final_state)`` with o in q's dtype and final_state fp32 (None unless asked). Differentiable in
    every tensor input. backend: "auto" (Triton on a CUDA device, else the reference), "triton" (chunked WY
    kernels), "reference" (the chunked PyTorch form). check_decay: reject positive log-decays (one device
    reduction).
    """
    _validate(q, k, v, q, scale, initial_state)
    for name, t in (("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if tuple(t.shape) != tuple(q.shape[:3]):
            raise ValueError(f"{name} must be [B, T, H] = {list(q.shape[:3])}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: one device expected")
    if check_decay and bool((g.detach() > 0).any()):
        raise ValueError("g must be a log-decay (every entry <= 0); got positive entries")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _pick_backend(backend, q) == "reference":
        return gated_delta_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state)
    from ... import backends
    from .triton_chunk import GDNChunkFunction

    return GDNChunkFunction.apply(q, k, v, g, beta, scale, initial_state, bool(output_final_state),
                                  backends.interpreting())
