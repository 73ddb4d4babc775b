"""Discretise a search into a hybrid and export it as a model directory a user can load.

The directory holds the weights (safetensors), the transformers config and ``dash_hybrid.json``
(each layer's operator: ``full_attention``, ``sliding_attention`` with its window, or
``sink_sliding_attention`` with window and sink). ``dash.load_hybrid(path)`` loads any export.
Where plain transformers can express the hybrid (full and sliding layers of one window width,
no sinks) the directory is written in a format with per-layer ``layer_types`` (Qwen2 for
Llama/Mistral-architecture teachers: the same blocks with zero q/k/v biases; Qwen2/Qwen3 as they
are), so ``AutoModelForCausalLM.from_pretrained(path)`` loads it too.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

from .candidates import Candidate
from .supernet import attention_layers

HYBRID_FILE = "dash_hybrid.json"
LINEAR_FILE = "dash_linear.safetensors"
_LLAMA_LIKE = ("llama", "mistral")
_LAYER_TYPES_NATIVE = ("qwen2", "qwen3")


def discretise(probabilities: torch.Tensor, candidates: Sequence[Candidate], budget: float,
               budget_kind: str = "full_layers", costs: Optional[torch.Tensor] = None) -> List[Candidate]:
    """Each layer's operator under a budget.

    ``probabilities``: [L, C] (or [L, Hkv, C], averaged over groups). Layers are ranked by their
    probability of full attention; the best-ranked get full attention while the budget allows
    (``full_layers``: K layers; ``kv_bytes``: total of ``costs`` per layer), the others their most
    probable efficient candidate.
    """
    probs = _layer_probabilities(probabilities)
    indices = _assign(_full_probability(probs, candidates), probs, candidates, budget, budget_kind, costs)
    return [candidates[i] for i in indices]


def sample_discrete(probabilities: torch.Tensor, candidates: Sequence[Candidate], budget: float,
                    generator: torch.Generator, budget_kind: str = "full_layers",
                    costs: Optional[torch.Tensor] = None) -> List[int]:
    """A random hybrid (candidate indices per layer) drawn as ``discretise`` exports one, from Gumbel-perturbed
    scores: the ranking of the layers for full attention is a Plackett-Luce draw by the odds p(full) / (1 - p(full))
    (with ``full_layers``: K layers drawn without replacement, each in proportion to its odds, Gumbel-top-K, so that
    a layer at p(full) 0.99 is nearly always in and one at 0.5 in about half the draws where the p(full) sum to K;
    weights p(full) themselves would leave a decided layer out of a quarter of the draws), each other layer's
    efficient candidate a draw from its efficient candidates' probabilities. ``generator``: a CPU generator, so
    that the draw is the same on any device. With probabilities of 0 and 1 it is ``discretise``'s hybrid."""
    probs = _layer_probabilities(probabilities).detach().cpu()

    def gumbel(shape):
        return -torch.log(-torch.log(torch.rand(shape, generator=generator).clamp(1e-20, 1 - 1e-7)))

    log_probs = probs.clamp_min(1e-30).log()
    p_full = _full_probability(probs, candidates).double()
    log_odds = p_full.clamp_min(1e-30).log() - (1 - p_full).clamp_min(1e-30).log()
    full_score = log_odds.float() + gumbel(probs.shape[:1])
    return _assign(full_score, log_probs + gumbel(probs.shape), candidates, budget, budget_kind, costs)


def _layer_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """[L, C] from [L, C] or [L, Hkv, C] (averaged over the groups: the export chooses whole layers)."""
    probs = probabilities.float()
    return probs.mean(1) if probs.dim() == 3 else probs


def _full_probability(probs: torch.Tensor, candidates: Sequence[Candidate]) -> torch.Tensor:
    """[L] each layer's probability of full attention, from [L, C]."""
    return probs[:, [i for i, c in enumerate(candidates) if c.is_full]].sum(-1)


def _assign(full_score: torch.Tensor, efficient_score: torch.Tensor, candidates: Sequence[Candidate],
            budget: float, budget_kind: str, costs: Optional[torch.Tensor]) -> List[int]:
    """Candidate indices per layer: the layers of highest ``full_score`` ([L]) full while the budget allows, the
    others the efficient candidate of highest ``efficient_score`` ([L, C])."""
    full = [i for i, c in enumerate(candidates) if c.is_full]
    efficient = [i for i, c in enumerate(candidates) if not c.is_full]
    if not full or not efficient:
        raise ValueError("discretising under a budget needs a full candidate and at least one efficient one")
    num_layers = efficient_score.shape[0]
    choice = [efficient[int(efficient_score[layer, efficient].argmax())] for layer in range(num_layers)]
    order = sorted(range(num_layers), key=lambda layer: -float(full_score[layer]))
    if budget_kind == "full_layers":
        if not 0 <= budget <= num_layers:
            raise ValueError(f"budget must be between 0 and {num_layers} full-attention layers, got {budget}")
        for layer in order[: int(budget)]:
            choice[layer] = full[0]
    elif budget_kind == "kv_bytes":
        if costs is None:
            raise ValueError("budget_kind='kv_bytes' needs the per-candidate costs")
        total = float(sum(costs[c] for c in choice))
        if total > budget:
            raise ValueError(f"even the all-efficient hybrid needs {total:.0f} bytes, over the budget {budget:.0f}")
        for layer in order:
            extra = float(costs[full[0]] - costs[choice[layer]])
            if total + extra <= budget:
                choice[layer], total = full[0], total + extra
    else:
        raise ValueError(f"budget_kind must be 'full_layers' or 'kv_bytes', got {budget_kind!r}")
    return choice


def _layer_entry(candidate: Candidate) -> dict:
    if candidate.is_linear:
        return {"type": "linear_attention", "kind": candidate.kind}
    if candidate.window is None:
        return {"type": "full_attention"}
    if candidate.sink:
        return {"type": "sink_sliding_attention", "window": candidate.window, "sink": candidate.sink}
    return {"type": "sliding_attention", "window": candidate.window}


def _teacher_state(model) -> dict:
    """The model's own weights (without DASH states a supernet attached to its layers)."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".dash." not in k}


def _plain_transformers_form(model, choices: Sequence[Candidate]):
    """(config, state_dict) in a layer_types format, or None when transformers cannot express the hybrid."""
    import transformers

    windows = {c.window for c in choices if c.window is not None}
    if any(c.sink or c.is_linear for c in choices) or len(windows) > 1:
        return None
    config = model.config
    layer_types = ["full_attention" if c.window is None else "sliding_attention" for c in choices]
    window = windows.pop() if windows else None
    state = _teacher_state(model)
    if config.model_type in _LAYER_TYPES_NATIVE:
        new = config.__class__.from_dict({**config.to_dict(), "layer_types": layer_types, "sliding_window": window,
                                          "use_sliding_window": window is not None})
        return new, state
    if config.model_type not in _LLAMA_LIKE or getattr(config, "attention_bias", False) or \
            getattr(config, "mlp_bias", False):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != config.hidden_size // config.num_attention_heads:
        return None  # Qwen2 derives the head dim from the hidden size
    new = transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, layer_types=layer_types,
        sliding_window=window, use_sliding_window=window is not None)
    for layer in range(config.num_hidden_layers):  # Qwen2 has q/k/v biases: zero reproduces Llama exactly
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"model.layers.{layer}.self_attn.{proj}.weight"]
            state[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return new, state


def export_hybrid(model, choices: Sequence[Candidate], output_dir: str, tokenizer=None,
                  report: Optional[dict] = None, linear_modules: Optional[Sequence] = None) -> dict:
    """Write the hybrid to ``output_dir``; returns the ``dash_hybrid.json`` content.

    ``linear_modules``: per layer, a mapping kind -> aligned linear module (needed where a layer chose one)."""
    import transformers
    from safetensors.torch import save_file

    layers = attention_layers(model)
    if len(choices) != len(layers):
        raise ValueError(f"{len(choices)} layer choices for a model with {len(layers)} attention layers")
    os.makedirs(output_dir, exist_ok=True)
    linear_tensors = {}
    for index, choice in enumerate(choices):
        if choice.is_linear:
            modules = linear_modules[index] if linear_modules is not None else {}
            module = modules[choice.kind] if choice.kind in modules else None
            if module is None:
                raise ValueError(f"layer {index} chose {choice.name} but no aligned linear module was given")
            for name, tensor in module.state_dict().items():
                linear_tensors[f"layers.{index}.{name}"] = tensor.detach().cpu().contiguous()
    if linear_tensors:
        save_file(linear_tensors, os.path.join(output_dir, LINEAR_FILE))
    plain = _plain_transformers_form(model, choices)
    if plain is not None:
        config, state = plain
    else:  # the teacher's own format; a fresh instance (a GGUF-loaded model refuses save_pretrained)
        fields = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        config = model.config.__class__.from_dict(fields)
        state = _teacher_state(model)
    config.architectures = [f"{type(config).__name__.replace('Config', '')}ForCausalLM"]
    with torch.device("meta"):
        target = transformers.AutoModelForCausalLM.from_config(config)
    target.load_state_dict(state, assign=True)
    target.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    hybrid = {"format": "dash-hybrid/1", "teacher_model_type": model.config.model_type,
              "loads_with_transformers": plain is not None,
              "layers": [_layer_entry(c) for c in choices], "report": report or {}}
    with open(os.path.join(output_dir, HYBRID_FILE), "w") as f:
        json.dump(hybrid, f, indent=1)
    return hybrid


def _candidate_of(entry: dict) -> Candidate:
    if entry["type"] == "linear_attention":
        return Candidate(kind=entry["kind"])
    return Candidate(window=entry.get("window"), sink=entry.get("sink", 0))


def load_hybrid(path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """Load an exported hybrid; every layer attends with its chosen operator (``generate`` works)."""
    from transformers import AutoModelForCausalLM

    with open(os.path.join(path, HYBRID_FILE)) as f:
        hybrid = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    layers = attention_layers(model)
    if len(layers) != len(hybrid["layers"]):
        raise ValueError(f"{path}: {len(hybrid['layers'])} layer entries for {len(layers)} attention layers")
    from .supernet import ATTN_IMPLEMENTATION, _register, attach_states

    _register()
    choices = {layer.layer_idx: _candidate_of(entry) for layer, entry in zip(layers, hybrid["layers"])}
    attach_states(layers, model.config, lambda layer: [choices[layer.layer_idx]], False, device)
    if os.path.exists(os.path.join(path, LINEAR_FILE)):
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(path, LINEAR_FILE))
        for index, layer in enumerate(layers):
            for module in layer.dash.linear.values():  # at most one: the layer's chosen kind
                prefix = f"layers.{index}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for layer in layers:
        layer.dash.backend = backend
        layer.dash.requires_grad_(False)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    # softmax-family layers decode against a KV cache; linear layers have no recurrent-state cache yet
    model.generation_config.use_cache = not any(len(layer.dash.linear) for layer in layers)
    return model
