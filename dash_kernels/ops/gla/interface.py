"""The public op: ``dash_kernels.gated_linear_attention`` (flash-linear-attention compatible semantics)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ... import backends
from .chunk import gla_chunked

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
MAX_KEY_DIM = 256  # the Triton kernels keep [K, BV] fp32 state tiles in registers
# The Triton backend's algorithm: "chunk" (chunked, tensor-core products; the default) or "recurrent"
# (one walk over the tokens); benchmarks and tests switch it.
TRITON_ALGORITHM = "chunk"


def _validate(q, k, v, g, scale, initial_state):
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: one device expected")
    if q.shape[1] < 1 or q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"q and v need T >= 1 and head dims >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"k and g must match q's shape {tuple(q.shape)}, got k {tuple(k.shape)}, g {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if initial_state is not None:
        want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must be a [B, H, K, V] = {list(want)} tensor, got {got}")
        if initial_state.dtype not in _FLOAT or initial_state.device != q.device:
            raise TypeError(f"initial_state must be a float tensor on {q.device}, got {initial_state.dtype} "
                            f"on {initial_state.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    chosen = backends.choose(backend, q.device, q.shape[-1], MAX_KEY_DIM, "key dim", "K")
    if chosen is not None:
        return chosen
    raise ValueError(f"backend must be one of 'auto', 'triton' or 'reference', got {backend!r}")


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                           scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                           output_final_state: bool = False, backend: str = "auto", check_decay: bool = True):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``; returns ``(o, final_state)``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-decay (<= 0); initial_state: [B, H, K, V].
    scale defaults to ``K ** -0.5``. fp32 state and accumulation; o in q's dtype, final_state fp32 (None
    unless asked). Differentiable in every tensor input, initial_state included.
    backend: "auto" (Triton on a CUDA device, else the chunked PyTorch reference), "triton", "reference".
    The Triton backend runs chunked kernels (states per chunk of 64 tokens, intra-chunk products on tensor
    cores); ``interface.TRITON_ALGORITHM = "recurrent"`` selects the single-walk kernels instead.
    check_decay: reject positive log-decays (one device reduction; the search turns it off in its loop).
    """
    _validate(q, k, v, g, scale, initial_state)
    if check_decay and bool((g.detach() > 0).any()):
        raise ValueError("g must be a log-decay (every entry <= 0); got positive entries")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _pick_backend(backend, q) == "reference":
        return gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state)
    if TRITON_ALGORITHM == "recurrent":
        from .triton_recurrent import GLARecurrentFunction

        return GLARecurrentFunction.apply(q, k, v, g, scale, initial_state, bool(output_final_state))
    from .triton_chunk import GLAChunkFunction

    return GLAChunkFunction.apply(q, k, v, g, scale, initial_state, bool(output_final_state),
                                  backends.interpreting())
