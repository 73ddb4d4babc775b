"""dash_kernels: fused attention kernels for hybrid-attention architecture search.

Public ops take ``[B, T, H, D]`` tensors and choose a backend (CUDA extension, Triton,
or the PyTorch reference) behind one function. This package never imports ``dash``
or ``transformers``.
"""
from .backends import report as backend_report
from .ops.gated_delta import gated_delta_rule
from .ops.gla import gated_linear_attention
from .ops.mixed_attention import mixed_attention, mixed_attention_reference

__version__ = "0.1.0"
__all__ = [
    "mixed_attention", "mixed_attention_reference", "gated_linear_attention", "gated_delta_rule",
    "backend_report", "__version__",
]
