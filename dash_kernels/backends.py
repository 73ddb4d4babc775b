"""Which backends this install can run, and why not where it cannot."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc.__class__.__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unusable_reason(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on tensors of this device, else why not."""
    error = _triton_import_error()
    if error:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device '{device}'"


def triton_usable(device: torch.device) -> bool:
    return triton_unusable_reason(device) is None


def choose(backend: str, device: torch.device, size: int, limit: int, what: str, symbol: str) -> Optional[str]:
    """``"auto"``, ``"reference"`` or ``"triton"`` resolved for an op whose Triton kernels take ``size <= limit``
    (``what``/``symbol`` name that size in errors, e.g. "head dim", "D"); None for any other name, which the op
    rejects with its own list of choices. ``auto`` takes Triton on a GPU only (the interpreter is for tests)."""
    if backend == "auto":
        return "triton" if triton_usable(device) and device.type != "cpu" and size <= limit else "reference"
    if backend == "reference":
        return backend
    if backend == "triton":
        reason = triton_unusable_reason(device)
        if reason:
            raise ValueError(f"backend='triton' is unavailable for these inputs: {reason}")
        if size > limit:
            raise ValueError(f"backend='triton' supports {what} {symbol} <= {limit}, got {symbol} = {size}")
        return backend
    return None


def cuda_extension_available() -> bool:
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True


def report() -> dict:
    """Backend name -> "available" or the reason it is not."""
    gpu = torch.cuda.is_available()
    triton_state = _triton_import_error() or (
        "available" if gpu else ("available (interpreter)" if interpreting() else "installed; no CUDA device")
    )
    return {
        "reference": "available",
        "sdpa": "available (mixed_attention: the CPU path of auto)",
        "triton": triton_state,
        "cuda": ("not built (see README: CUDA extension)" if not cuda_extension_available()
                 else "available" if gpu else "built; no CUDA device"),
    }
