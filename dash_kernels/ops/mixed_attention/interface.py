"""The public op: ``dash_kernels.mixed_attention``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ... import backends
from .reference import mixed_attention_reference
from .sdpa import mixed_attention_sdpa
from .spec import make_plan
from .triton_op import MAX_HEAD_DIM

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate_tensors(q, k, v, weights, num_candidates: int):
    for name, t in (("q", q), ("k", k), ("v", v), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device or weights.device != q.device:
        raise ValueError(
            f"q, k, v and weights must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}, weights {weights.device}"
        )
    batch, seq, heads_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v must be [B, T, Hkv, D] = [{batch}, {seq}, Hkv, {head_dim}] to match q, got {tuple(k.shape)}"
        )
    if seq < 1 or batch < 1 or head_dim < 1:
        raise ValueError(f"q must have B, T, D >= 1, got shape {tuple(q.shape)}")
    heads_kv = k.shape[2]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if weights.dim() == 1:
        expected = (num_candidates,)
    elif weights.dim() == 2:
        expected = (heads_q, num_candidates)
    else:
        expected = None
    if expected is None or tuple(weights.shape) != expected:
        raise ValueError(
            f"weights must be [C] = [{num_candidates}] or [Hq, C] = [{heads_q}, {num_candidates}] "
            f"(one entry per window), got shape {tuple(weights.shape)}"
        )


def _pick_backend(backend: str, q: torch.Tensor, k: torch.Tensor, num_candidates: int) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "sdpa":
        return backend
    chosen = backends.choose(backend, q.device, q.shape[-1], MAX_HEAD_DIM, "head dim", "D")
    if backend == "auto" and chosen == "reference":  # no Triton here (the CPU): SDPA per candidate
        return "sdpa"
    if chosen is not None:
        # "auto" stays on Triton until the CUDA kernel is measured faster on the GPU (benchmarks/NOTES.md)
        return chosen
    if backend == "cuda":
        from .cuda_op import unsupported_reason

        reason = unsupported_reason(q, k, num_candidates)
        if reason:
            raise ValueError(f"backend='cuda' is unavailable for these inputs: {reason}; use 'auto', 'triton', "
                             "'sdpa' or 'reference'")
        return "cuda"
    raise ValueError(f"backend must be one of 'auto', 'triton', 'sdpa', 'reference' or 'cuda', got {backend!r}")


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    windows: Sequence[Optional[int]],
    sinks: Optional[Sequence[int]] = None,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted mixture of causal softmax attentions under several masks, in one pass.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA, no copies).
            float16, bfloat16 or float32, one dtype and device; any strides.
        weights: ``[C]`` (one mixture for all heads) or ``[Hq, C]``; used as given (not normalised).
        windows: C entries, each an int ``W >= 1`` or ``None`` (full causal attention).
        sinks: None, or C ints ``S >= 0``: candidate c also sees keys ``j < S_c``.
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on a GPU, else ``"sdpa"``) | ``"triton"`` | ``"sdpa"`` (PyTorch's
            scaled_dot_product_attention once per candidate with a nonzero weight, summed: not fused; the CPU
            path) | ``"reference"`` (materialised fp32 scores: the yardstick) | ``"cuda"`` (the CUDA C++ kernels,
            where the extension is built: bf16/fp16, D 64 or 128, up to 8 candidates).

    Candidate c lets query t see key j iff ``j <= t`` and (``W_c is None`` or ``t - j < W_c`` or
    ``j < S_c``). Returns ``Y[b, t, h] = sum_c weights[(h,) c] * O_c[b, t, h]`` in q's dtype,
    differentiable in q, k, v and weights.
    """
    plan = make_plan(windows, sinks)
    _validate_tensors(q, k, v, weights, plan.num_candidates)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    chosen = _pick_backend(backend, q, k, plan.num_candidates)
    if chosen == "reference":
        return mixed_attention_reference(q, k, v, weights, plan.windows, plan.sinks, scale=scale)
    if chosen == "sdpa":
        return mixed_attention_sdpa(q, k, v, weights, plan.windows, plan.sinks, scale=scale)
    from .op import mixed_attention_fwd

    y, _, _ = mixed_attention_fwd(q, k, v, weights, plan.encoded_windows, list(plan.sinks), float(scale), chosen)
    return y
