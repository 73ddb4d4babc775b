"""DASH search layer: model surgery (HF model -> supernet) and candidates, built on ``dash_kernels``.

Alignment, search, export and the CLI arrive with their own issues.
"""
from .candidates import Candidate, default_candidates, parse_candidates
from .export import discretise, export_hybrid, load_hybrid
from .models import load_model
from .supernet import Supernet, build_supernet

__all__ = ["Candidate", "default_candidates", "parse_candidates", "Supernet", "build_supernet", "load_model", "discretise", "export_hybrid", "load_hybrid"]
