"""DASH search layer (model surgery, candidates, alignment, search, export, CLI).

Built on ``dash_kernels``; see DESIGN.md. The search pipeline arrives with its own issue;
today this package only re-exports the kernel op it is built on.
"""
from dash_kernels import mixed_attention

__all__ = ["mixed_attention"]
