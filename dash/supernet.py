"""Supernet surgery: every attention layer of a transformers causal LM becomes a DASH mixture.

Each layer outputs ``sum_c softmax(alpha_layer / tau)[c] * O_c``, where the softmax-family
candidates ``O_c`` are computed from the teacher's own projections and RoPE in one call of
``dash_kernels.mixed_attention``. Nothing of the modeling code is copied: the layers keep their
modules and call a registered attention function (transformers' ``AttentionInterface``), which
reads the layer's architecture logits from a small ``DashLayerState`` attached to the module.
Works for the families whose attention modules take (query, key, value) after RoPE through
that interface: Llama (SmolLM2), Qwen2/Qwen2.5, Qwen3, Mistral.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dash_kernels import mixed_attention

from .candidates import Candidate, default_candidates, parse_candidates
from .linear import make_linear

ATTN_IMPLEMENTATION = "dash_mixed"


class DashLayerState(nn.Module):
    """Architecture logits of one attention layer and its candidates (as seen by that layer).

    ``alpha`` is ``[C]`` (one mixture per layer) or ``[Hkv, C]`` (one per KV-head group).
    """

    def __init__(self, candidates: Sequence[Candidate], heads_q: int, heads_kv: int,
                 per_kv_group: bool = False, teacher_window: Optional[int] = None,
                 hidden_size: Optional[int] = None, head_dim: Optional[int] = None):
        super().__init__()
        self.candidates = list(candidates)
        self.heads_q, self.heads_kv = heads_q, heads_kv
        softmax = [c for c in self.candidates if not c.is_linear]
        self.softmax_index = [i for i, c in enumerate(self.candidates) if not c.is_linear]
        self.linear_index = [i for i, c in enumerate(self.candidates) if c.is_linear]
        # a device tensor, moved with the model: indexing with a Python list would copy it to the GPU
        # (a blocking transfer) in every layer of every step
        self.register_buffer("softmax_positions", torch.tensor(self.softmax_index, dtype=torch.long),
                             persistent=False)
        # a teacher layer that is itself sliding-window caps every candidate at its window
        self.windows = [_cap(c.window, teacher_window) for c in softmax]
        self.sinks = [c.sink if w is not None else 0 for c, w in zip(softmax, self.windows)]
        shape = (heads_kv, len(self.candidates)) if per_kv_group else (len(self.candidates),)
        self.alpha = nn.Parameter(torch.zeros(shape))
        self.teacher_window = teacher_window
        # one teacher-aligned module per linear candidate kind ("gla", "gdn"), in candidate order
        self.linear = nn.ModuleDict()
        for i in self.linear_index:
            if hidden_size is None or head_dim is None:
                raise ValueError("a linear candidate needs the layer's hidden size and head dim")
            self.linear[self.candidates[i].kind] = make_linear(self.candidates[i].kind, hidden_size, heads_q,
                                                              heads_kv, head_dim)
        self.hidden = None  # the layer input, stashed by a pre-hook for the linear candidate's gate
        self.tau = 1.0
        self.backend = "auto"
        self.teacher_mode = False  # True: attend like the unmodified layer (used for distillation targets)
        self.align_mode = False  # with teacher_mode: also score the linear candidates against the teacher
        self.align_losses = {}  # kind -> relative error of this batch
        self.score_candidate = None  # with teacher_mode: also score this candidate index against the teacher
        self.candidate_error = None  # ... its relative output error (selector baselines)
        self.forced = None  # a candidate index: compute exactly that candidate, whatever alpha says (Supernet.fixed)
        self.sample = None  # a one-hot of alpha's shape: the straight-through relaxation's hybrid (Supernet.sampled)

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.alpha.float() / self.tau, dim=-1)

    def mixture_weights(self) -> torch.Tensor:
        """``[C]`` or ``[Hq, C]`` weights for ``mixed_attention`` (KV groups expanded to query heads)."""
        probs = self.probabilities()
        if self.forced is not None:
            probs = F.one_hot(torch.tensor(self.forced, device=probs.device), probs.shape[-1]).to(probs.dtype) \
                .expand_as(probs)
        elif self.sample is not None:  # forward: exactly the sampled one-hot (p - p is 0); backward: d/d probs
            probs = self.sample.to(probs.dtype) + probs - probs.detach()
        if probs.dim() == 2:
            probs = probs.repeat_interleave(self.heads_q // self.heads_kv, dim=0)
        return probs


def _cap(window: Optional[int], teacher_window: Optional[int]) -> Optional[int]:
    if teacher_window is None:
        return window
    return teacher_window if window is None else min(window, teacher_window)


def dash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] after RoPE."""
    state = getattr(module, "dash", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} has no DASH state: build the model with dash.build_supernet")
    if query.shape[2] != key.shape[2]:
        if state.teacher_mode or len(state.linear):
            raise NotImplementedError(
                "the DASH supernet and linear candidates run whole sequences (no KV cache): got "
                f"{query.shape[2]} queries against {key.shape[2]} keys; call the model with use_cache=False"
            )
        state.hidden = None
        return _cached_decode(state, query, key, value, scaling), None
    if dropout:
        raise ValueError(f"attention dropout is not supported in the supernet, got dropout={dropout}")
    if kwargs.get("sliding_window") != state.teacher_window and kwargs.get("sliding_window") is not None:
        raise RuntimeError(
            f"layer {module.layer_idx} runs with sliding_window={kwargs['sliding_window']} but its DASH state was "
            f"built for {state.teacher_window}: rebuild the supernet after changing the config"
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    hidden, state.hidden = state.hidden, None
    if state.teacher_mode:
        one = torch.ones(1, device=q.device)
        out = mixed_attention(q, k, v, one, [state.teacher_window], scale=scaling, backend=state.backend)
        if state.score_candidate is not None:
            cand = state.candidates[state.score_candidate]
            if cand.is_linear:
                other = state.linear[cand.kind](q, k, v, hidden)
            else:
                pos = state.softmax_index.index(state.score_candidate)
                other = mixed_attention(q, k, v, one, [state.windows[pos]], [state.sinks[pos]], scale=scaling,
                                        backend=state.backend)
            target = out.float()
            state.candidate_error = float((other.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
        if state.align_mode and len(state.linear):
            target = out.detach().float()
            norm = target.pow(2).mean().clamp_min(1e-12)
            state.align_losses = {kind: (module(q, k, v, hidden).float() - target).pow(2).mean() / norm
                                  for kind, module in state.linear.items()}
        return out, None
    weights = state.mixture_weights()
    out = 0
    if state.windows:
        softmax_weights = weights.index_select(-1, state.softmax_positions.to(weights.device))
        out = mixed_attention(q, k, v, softmax_weights, state.windows, state.sinks,
                              scale=scaling, backend=state.backend)
    for index in state.linear_index:
        w_lin = weights[..., index]  # [] or [Hq]
        w_lin = w_lin.view(1, 1, -1, 1) if w_lin.dim() == 1 else w_lin
        module = state.linear[state.candidates[index].kind]
        out = out + (w_lin * module(q, k, v, hidden).float()).to(q.dtype)
    return out, None


def _cached_decode(state, query, key, value, scaling):
    """The last queries of a sequence against all its cached keys (generation with a KV cache): each
    softmax candidate's mask at the queries' true positions, through SDPA; the mixture as in the op."""
    import torch.nn.functional as F

    from dash_kernels.ops.mixed_attention.spec import candidate_mask

    q_len, kv_len = query.shape[2], key.shape[2]
    positions = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    keys = torch.arange(kv_len, device=query.device)[None, :]
    weights = state.mixture_weights().index_select(-1, state.softmax_positions.to(query.device))  # [C] or [Hq, C]
    out = 0
    # a forced choice (Supernet.fixed) computes its one candidate: the others' weights are exactly 0, so the sum is
    # the same to the bit, with a fraction of the kernels of a decode step
    active = range(len(state.windows)) if state.forced is None else [state.softmax_index.index(state.forced)]
    for c in active:
        window, sink = state.windows[c], state.sinks[c]
        mask = candidate_mask(positions, keys, window, sink)
        o_c = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        w_c = weights[..., c]
        out = out + (w_c.view(1, -1, 1, 1) if w_c.dim() == 1 else w_c) * o_c.float()
    return out.to(query.dtype).transpose(1, 2)  # [B, q_len, Hq, D], as the whole-sequence path returns


def _stash_hidden(module, args, kwargs):
    module.dash.hidden = kwargs.get("hidden_states", args[0] if args else None)


def dash_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                        attention_mask=None, **kwargs):
    """The kernel applies each candidate's causal mask itself; padding is not supported."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "the DASH supernet expects unpadded (packed) sequences, but the attention_mask masks some tokens; "
            "pack the data to full sequences instead of padding"
        )
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, dash_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dash_attention_mask)


def teacher_window(layer: nn.Module, config) -> Optional[int]:
    """The window a teacher layer itself attends with (None for full attention)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer.layer_idx] == "sliding_attention" else None
    window = getattr(layer, "sliding_window", None)
    return window if window is not None else getattr(config, "sliding_window", None)


def attention_layers(model: nn.Module) -> list:
    """The self-attention modules of a transformers causal LM, in layer order."""
    layers = [m for m in model.modules()
              if all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]
    if not layers:
        raise ValueError(f"no attention layers with q/k/v/o projections found in {type(model).__name__}")
    return sorted(layers, key=lambda m: m.layer_idx)


def attention_shape(config) -> tuple:
    """(query heads, KV heads, head dim) of a transformers config."""
    heads_q = config.num_attention_heads
    heads_kv = getattr(config, "num_key_value_heads", None) or heads_q
    return heads_q, heads_kv, getattr(config, "head_dim", None) or config.hidden_size // heads_q


def attach_states(layers, config, candidates_of, per_kv_group: bool, device) -> None:
    """Give every attention layer its DashLayerState (and the input stash a linear candidate needs)."""
    heads_q, heads_kv, head_dim = attention_shape(config)
    for layer in layers:
        cands = candidates_of(layer)
        layer.dash = DashLayerState(cands, heads_q, heads_kv, per_kv_group, teacher_window(layer, config),
                                    hidden_size=config.hidden_size, head_dim=head_dim).to(device)
        if any(c.is_linear for c in cands) and not getattr(layer, "_dash_stash", None):
            layer._dash_stash = layer.register_forward_pre_hook(_stash_hidden, with_kwargs=True)


class Supernet:
    """A frozen causal LM whose attention layers are DASH mixtures; only the logits train."""

    def __init__(self, model: nn.Module, layers: list, candidates: list):
        self.model = model
        self.layers = layers
        self.candidates = candidates

    @property
    def states(self) -> list:
        return [layer.dash for layer in self.layers]

    def arch_parameters(self) -> list:
        return [s.alpha for s in self.states]

    def linear_parameters(self) -> list:
        return [p for s in self.states for p in s.linear.parameters()]

    @contextlib.contextmanager
    def aligning(self):
        """Teacher forward that also scores every layer's linear candidate (stage 1)."""
        for s in self.states:
            s.align_mode = True
        try:
            with self.teacher():
                yield self
        finally:
            for s in self.states:
                s.align_mode = False

    def set_temperature(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        for s in self.states:
            s.tau = float(tau)

    def set_backend(self, backend: str) -> None:
        for s in self.states:
            s.backend = backend

    def probabilities(self) -> torch.Tensor:
        """[L, C] (or [L, Hkv, C]) candidate probabilities."""
        return torch.stack([s.probabilities().detach() for s in self.states])

    def discrete_choice(self) -> list:
        """Each layer's most probable candidate (per KV group: the group-averaged choice)."""
        probs = self.probabilities()
        if probs.dim() == 3:
            probs = probs.mean(1)
        return [self.candidates[i].name for i in probs.argmax(-1).tolist()]

    @contextlib.contextmanager
    def teacher(self):
        """Within this block the model computes exactly as the unmodified teacher."""
        for s in self.states:
            s.teacher_mode = True
        try:
            yield self
        finally:
            for s in self.states:
                s.teacher_mode = False

    @contextlib.contextmanager
    def fixed(self, choices: Sequence[int]):
        """Within this block layer i computes exactly candidate ``choices[i]`` (the logits are untouched)."""
        if len(choices) != len(self.states):
            raise ValueError(f"choices has {len(choices)} entries, the model {len(self.states)} layers")
        for s, index in zip(self.states, choices):
            s.forced = int(index)
        try:
            yield self
        finally:
            for s in self.states:
                s.forced = None

    @contextlib.contextmanager
    def sampled(self, one_hots: Sequence[torch.Tensor]):
        """Within this block layer i computes the hybrid ``one_hots[i]`` (alpha's shape) in the forward, while the
        gradient reaches alpha through the probabilities as if they had been the weights (straight-through)."""
        if len(one_hots) != len(self.states):
            raise ValueError(f"one_hots has {len(one_hots)} entries, the model {len(self.states)} layers")
        for s, one_hot in zip(self.states, one_hots):
            if one_hot.shape != s.alpha.shape:
                raise ValueError(f"a sampled one-hot must have the logits' shape {tuple(s.alpha.shape)}, "
                                 f"got {tuple(one_hot.shape)}")
            s.sample = one_hot
        try:
            yield self
        finally:
            for s in self.states:
                s.sample = None

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("use_cache", False)
        return self.model(*args, **kwargs)


def build_supernet(model: nn.Module, candidates: Optional[Sequence] = None, *, per_kv_group: bool = False,
                   tau: float = 1.0, backend: str = "auto", freeze: bool = True) -> Supernet:
    """Turn ``model`` (a transformers causal LM) into a DASH supernet, in place.

    ``candidates``: names ('full', 'swa512', 'sink64_swa512'), dicts or ``Candidate``s; default
    ``default_candidates(config.max_position_embeddings)``. Every model weight is frozen unless
    ``freeze=False``; the logits start at zero (uniform mixture).
    """
    config = model.config
    if candidates is None:
        candidates = default_candidates(int(getattr(config, "max_position_embeddings", 8192)))
    candidates = parse_candidates(candidates)
    _register()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    layers = attention_layers(model)
    device = next(model.parameters()).device
    attach_states(layers, config, lambda layer: candidates, per_kv_group, device)
    net = Supernet(model, layers, candidates)
    net.set_temperature(tau)
    net.set_backend(backend)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        config._attn_implementation = ATTN_IMPLEMENTATION
    return net
