"""Launchers of the CUDA C++ kernels (csrc/mixed_attention, built as ``dash_kernels._C``).

They keep the Triton launchers' contract: the forward returns (Y, O [C, B, T, Hq, D], LSE [B, Hq, C, T] base 2,
sorted candidate order), the backward (dq, dk, dv, delta [B, Hq, C, T]), so either backward consumes either
forward's O and LSE.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import cuda_extension_available
from .spec import CandidatePlan

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
MAX_CANDIDATES = 8  # csrc/mixed_attention/fwd_kernel.cuh: kMaxCandidates


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, num_candidates: int) -> Optional[str]:
    """None when the CUDA kernel takes these inputs, else why not (for the error of backend='cuda')."""
    if not cuda_extension_available():
        return "the CUDA C++ extension (dash_kernels._C) is not built in this install (see README: CUDA extension)"
    if q.device.type != "cuda":
        return f"it needs CUDA tensors, got device '{q.device}'"
    from ... import _C  # noqa: F401  registers torch.ops.dash_kernels_cuda

    major, minor = torch.cuda.get_device_capability(q.device)
    built = list(torch.ops.dash_kernels_cuda.built_archs())
    if major * 10 + minor not in built:
        return (f"it was built for compute capabilities {[f'{a // 10}.{a % 10}' for a in built]}, the device is "
                f"{major}.{minor} (rebuild with DASH_CUDA_ARCHS={major}.{minor})")
    if q.dtype not in DTYPES:
        return f"it supports dtypes bfloat16 and float16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it supports head dims {HEAD_DIMS}, got D = {q.shape[-1]}"
    if num_candidates > MAX_CANDIDATES:
        return f"it takes at most {MAX_CANDIDATES} candidates, got {num_candidates}"
    if q.shape[0] * q.shape[2] > 65535:
        return f"it takes B * Hq <= 65535, got {q.shape[0] * q.shape[2]}"
    need = torch.ops.dash_kernels_cuda.shared_memory_bytes(q.shape[-1])
    have = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", need)
    if need > have:
        return f"its kernels need {need} bytes of shared memory per block at D = {q.shape[-1]}; the device has {have}"
    return None


def _rows_aligned(x: torch.Tensor) -> torch.Tensor:
    """The kernels load 16-byte row chunks: a last-dim-contiguous, 16-byte-aligned view, else a fresh copy
    (``contiguous()`` would return a contiguous view at an odd offset as it is)."""
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:3]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def mixed_attention_fwd(q, k, v, weights, plan: CandidatePlan, scale: float):
    """(Y, O, LSE) from the CUDA kernel; see the module docstring."""
    from . import triton_op
    from ... import _C  # noqa: F401  registers torch.ops.dash_kernels_cuda

    w, _, _ = triton_op.sorted_tables(plan, weights, q.shape[2], q.device)
    return torch.ops.dash_kernels_cuda.mixed_attention_fwd(
        _rows_aligned(q), _rows_aligned(k), _rows_aligned(v), w, list(plan.sorted_windows),
        list(plan.sorted_sinks), float(scale))


def mixed_attention_bwd(dy, q, k, v, weights, o, lse, plan: CandidatePlan, scale: float):
    """(dq, dk, dv, delta) from the CUDA kernels; see the module docstring."""
    from . import triton_op
    from ... import _C  # noqa: F401

    w, _, _ = triton_op.sorted_tables(plan, weights, q.shape[2], q.device)
    return torch.ops.dash_kernels_cuda.mixed_attention_bwd(
        _rows_aligned(dy), _rows_aligned(q), _rows_aligned(k), _rows_aligned(v), w, o, lse, list(plan.sorted_windows),
        list(plan.sorted_sinks), float(scale))
