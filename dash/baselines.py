"""Selector baselines: other ways to choose which layers keep full attention under the same budget.

Each selector returns the set of K layers that stay full; every other layer gets one efficient candidate (the
same one for every method), and the hybrid goes through DASH's own export path. Methods:
  uniform       K layers evenly spaced through the depth
  random        K layers drawn at random (run several seeds)
  first, last   the first or the last K layers
  ppl_drop      swap one layer at a time to the efficient operator; keep full the K whose swap raises the
                calibration loss most
  attn_mse      per layer, the relative error of the efficient operator's attention output against full
                attention on the teacher's own activations; keep full the K largest
  kl_restore    start from all-efficient; restore one layer at a time to full attention; keep full the K whose
                restoration lowers KL(teacher || hybrid) most (KL-guided layer selection)
  duo_gate      DuoAttention-style: a learned gate per layer mixes full and efficient attention; trained to keep
                the final hidden states close to the teacher's (relative L2) with an L1 pull toward the efficient
                operator; keep full the K layers with the largest gates
  teacher / all_efficient   the two bounds (every layer full / none)
The scoring selectors run forward passes only, on calibration rows, and report their cost (tokens, seconds).
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Optional, Sequence

import torch

from .candidates import Candidate
from .supernet import Supernet

METHODS = ("uniform", "random", "first", "last", "ppl_drop", "attn_mse", "kl_restore", "duo_gate", "teacher",
           "all_efficient")


def set_choices(net: Supernet, choices: Sequence[int]) -> None:
    """One-hot logits: layer i computes exactly candidate ``choices[i]`` (weight 1, others 0 to fp32 precision)."""
    for state, index in zip(net.states, choices):
        with torch.no_grad():
            alpha = torch.full_like(state.alpha, -1e4)
            alpha[..., index] = 1e4
            state.alpha.copy_(alpha)


def _positions(net: Supernet, efficient: Candidate) -> tuple:
    names = [c.name for c in net.candidates]
    if "full" not in names:
        raise ValueError("the selector baselines need the 'full' candidate in the supernet")
    if efficient.name not in names:
        raise ValueError(f"efficient candidate {efficient.name!r} is not among the supernet's {names}")
    return names.index("full"), names.index(efficient.name)


def _loss(net: Supernet, rows: torch.Tensor, teacher_hidden: Optional[List[torch.Tensor]], kind: str) -> float:
    """Mean next-token NLL (kind 'nll') or KL(teacher || model) ('kl') over the calibration rows."""
    import torch.nn.functional as F

    model = net.model
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, row in enumerate(rows):
            hidden = model.base_model(row[None], use_cache=False).last_hidden_state[0]
            logits = head(hidden).float()
            if kind == "nll":
                total += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
                count += row.numel() - 1
            else:
                t_logp = torch.log_softmax(head(teacher_hidden[i]).float(), -1)
                total += (t_logp.exp() * (t_logp - torch.log_softmax(logits, -1))).sum().item()
                count += row.numel()
    return total / max(1, count)


DUO_STEPS, DUO_LR, DUO_L1 = 40, 0.1, 0.05


def _duo_gate(net: Supernet, rows: torch.Tensor, full: int, eff: int, seed: int) -> List[float]:
    """Per layer, the learned gate of full attention (DuoAttention's objective, per layer instead of per head)."""
    saved = [s.alpha.detach().clone() for s in net.states]
    taus = [s.tau for s in net.states]
    for state in net.states:  # a two-way gate: sigmoid(a_full - a_eff), every other candidate off
        with torch.no_grad():
            state.alpha.fill_(-1e4)
            state.alpha[..., full] = 0.0
            state.alpha[..., eff] = 0.0
        state.tau = 1.0
    params = [s.alpha for s in net.states]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=DUO_LR)
    generator = torch.Generator().manual_seed(seed)
    try:
        for _ in range(DUO_STEPS):
            row = rows[int(torch.randint(len(rows), (1,), generator=generator))][None]
            with torch.no_grad(), net.teacher():
                target = net.model.base_model(row, use_cache=False).last_hidden_state.float()
            hidden = net.model.base_model(row, use_cache=False).last_hidden_state.float()
            gates = torch.stack([s.probabilities()[..., full].mean() for s in net.states])
            loss = (hidden - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12) + DUO_L1 * gates.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return [float(s.probabilities()[..., full].mean()) for s in net.states]
    finally:
        for state, alpha, tau in zip(net.states, saved, taus):
            with torch.no_grad():
                state.alpha.copy_(alpha)
            state.tau = tau


def select(net: Supernet, method: str, budget: int, efficient: Candidate, rows: Optional[torch.Tensor] = None,
           seed: int = 0) -> Dict:
    """Layers that keep full attention under ``method``; returns {"full_layers", "choices", "cost"}.

    ``rows``: [N, T] calibration token rows (needed by ppl_drop, attn_mse, kl_restore)."""
    if method not in METHODS:
        raise ValueError(f"unknown selector {method!r}; known: {list(METHODS)}")
    num_layers = len(net.states)
    if not 0 <= budget <= num_layers:
        raise ValueError(f"budget must be between 0 and {num_layers} full-attention layers, got {budget}")
    full, eff = _positions(net, efficient)
    scored = method in ("ppl_drop", "attn_mse", "kl_restore", "duo_gate")
    if scored and (rows is None or rows.numel() == 0):
        raise ValueError(f"selector {method!r} needs calibration rows")
    started = time.time()
    scores: Optional[List[float]] = None
    if method == "uniform":
        keep = sorted({min(num_layers - 1, int((i + 0.5) * num_layers / budget)) for i in range(budget)})
    elif method == "random":
        keep = sorted(random.Random(seed).sample(range(num_layers), budget))
    elif method == "first":
        keep = list(range(budget))
    elif method == "last":
        keep = list(range(num_layers - budget, num_layers))
    elif method == "teacher":
        keep = list(range(num_layers))
    elif method == "all_efficient":
        keep = []
    elif method == "ppl_drop":
        scores = []
        for layer in range(num_layers):
            set_choices(net, [eff if i == layer else full for i in range(num_layers)])
            scores.append(_loss(net, rows, None, "nll"))
    elif method == "kl_restore":
        teacher_hidden = []
        with torch.no_grad(), net.teacher():
            for row in rows:
                teacher_hidden.append(net.model.base_model(row[None], use_cache=False).last_hidden_state[0])
        set_choices(net, [eff] * num_layers)
        base = _loss(net, rows, teacher_hidden, "kl")
        scores = []
        for layer in range(num_layers):
            set_choices(net, [full if i == layer else eff for i in range(num_layers)])
            scores.append(base - _loss(net, rows, teacher_hidden, "kl"))  # KL removed by restoring this layer
    elif method == "duo_gate":
        scores = _duo_gate(net, rows, full, eff, seed)
    else:  # attn_mse: on the teacher's own activations, each layer also runs the efficient operator
        errors = torch.zeros(num_layers)
        for state in net.states:
            state.score_candidate = eff
        try:
            with torch.no_grad(), net.teacher():
                for row in rows:
                    net.model.base_model(row[None], use_cache=False)
                    errors += torch.tensor([s.candidate_error for s in net.states])
        finally:
            for state in net.states:
                state.score_candidate = None
        scores = (errors / len(rows)).tolist()
    if scores is not None:
        keep = sorted(sorted(range(num_layers), key=lambda i: -scores[i])[:budget])
    if method not in ("teacher", "all_efficient") and len(keep) != budget:
        raise RuntimeError(f"selector {method} chose {len(keep)} layers for a budget of {budget}")
    choices = [net.candidates[full] if i in keep else efficient for i in range(num_layers)]
    tokens = int(rows.numel()) if scored else 0
    passes = {"ppl_drop": num_layers, "kl_restore": num_layers + 2, "attn_mse": 1,
              "duo_gate": 3 * DUO_STEPS}.get(method, 0)
    return {"method": method, "budget": budget, "seed": seed, "full_layers": keep, "choices": choices,
            "scores": scores, "cost": {"forward_tokens": tokens * passes, "seconds": time.time() - started}}
