"""Selector baselines: other ways to choose which layers keep full attention under the same budget.

Each selector returns the set of K layers that stay full; every other layer gets one efficient candidate (the
same one for every method), and the hybrid goes through DASH's own export path. Methods:
  uniform       K layers evenly spaced through the depth
  random        K layers drawn at random (run several seeds)
  first, last   the first or the last K layers
  ppl_drop      swap one layer at a time to the efficient operator; keep full the K whose swap raises the
                calibration loss (next-token NLL) most
  attn_mse      per layer, the relative error of the efficient operator's attention output against full
                attention on the teacher's own activations; keep full the K largest
  kl_restore    start from all-efficient; restore one layer at a time to full attention; keep full the K whose
                restoration lowers KL(teacher || hybrid) most (KL-guided layer selection)
  duo_gate      DuoAttention (Xiao et al., 2024): a learned gate per KV-head group mixes full attention and the
                efficient operator, ``gate * full + (1 - gate) * efficient`` (whatever the supernet's own
                granularity: a per-layer supernet gets per-group gates for the run). Trained on synthetic
                passkey-retrieval sequences (``dash.ruler``'s passkey generator, deterministic by seed, as long as
                the calibration rows) so that the mixed model's final hidden states on the answer span match the
                full-attention teacher's (relative L2), plus an L1 pull of the gates toward the efficient operator;
                keep full the K layers with the largest mean gate
  teacher / all_efficient   the two bounds (every layer full / none)
The scoring selectors run on calibration rows (duo_gate: on passkey samples of the rows' length) and report their
cost: tokens through forward passes (duo_gate also the tokens through backward passes) and wall seconds. Given the
rows' answer mask (``answers``: retrieval rows, ``dash.data``), ppl_drop and kl_restore weight their loss's tokens
as DASH's ``answers`` objective does (``dash.search.answer_weights``): the same data and the same token weighting
as the search, so a difference between the methods is the method's.
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Optional, Sequence

import torch

from .candidates import Candidate
from .search import answer_margin_shortfall, answer_weights, kl_from_log_probs, label_nll
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
    if efficient.is_full:
        raise ValueError("the efficient candidate must not be full attention")
    return names.index("full"), names.index(efficient.name)


def teacher_hidden_states(net: Supernet, rows: torch.Tensor) -> List[torch.Tensor]:
    """The teacher's last hidden states of each calibration row (the targets of the 'kl' loss)."""
    with torch.no_grad(), net.teacher():
        return [net.model.base_model(row[None], use_cache=False).last_hidden_state[0] for row in rows]


def calibration_weights(answers: Optional[torch.Tensor], answer_weight: float) -> Optional[List[torch.Tensor]]:
    """Per calibration row, the [T] token weights of DASH's ``answers`` objective over all the rows (mean KL plus
    ``answer_weight`` times the answers' mean KL); None without an answer mask."""
    if answers is None:
        return None
    return list(answer_weights(answers, answer_weight))


def _loss(net: Supernet, rows: torch.Tensor, teacher_hidden: Optional[List[torch.Tensor]], kind: str,
          weights: Optional[List[torch.Tensor]] = None,
          label_weights: Optional[List[torch.Tensor]] = None, margin: bool = False) -> float:
    """Mean next-token NLL (kind 'nll') or KL(teacher || model) ('kl') over the calibration rows; with ``weights``
    (one [T] tensor per row, weight t for the prediction at position t) each token's loss is weighted
    (``dash.search``'s long_range or answers objective). ``label_weights`` (kind 'kl'; per row, [T]): plus the
    next-token NLL times these, summed and divided by the same count (the answers_nll objective); with ``margin``
    the next token's greedy-margin shortfall from the teacher's instead of its NLL (the answers_margin objective,
    ``dash.search.answer_margin_shortfall``)."""
    import torch.nn.functional as F

    model = net.model
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, row in enumerate(rows):
            hidden = model.base_model(row[None], use_cache=False).last_hidden_state[0]
            logits = head(hidden).float()
            if kind == "nll":
                per_token = F.cross_entropy(logits[:-1], row[1:], reduction="none")
                total += (per_token if weights is None else per_token * weights[i][:-1]).sum().item()
                count += row.numel() - 1
            else:
                logp = torch.log_softmax(logits, -1)
                teacher_logits = head(teacher_hidden[i]).float()
                per_token = kl_from_log_probs(logp, torch.log_softmax(teacher_logits, -1))
                total += (per_token if weights is None else per_token * weights[i]).sum().item()
                if label_weights is not None:
                    term = (answer_margin_shortfall(logits[:-1], teacher_logits[:-1], row[1:]) if margin
                            else label_nll(logp[:-1], row[1:]))
                    total += (term * label_weights[i][:-1]).sum().item()
                count += row.numel()
    return total / max(1, count)


# one passkey sample a step: 40 on the CPU (a smoke), 400 on a GPU (seconds there; DuoAttention itself trains
# ~2000 steps at lr 0.02, per head of a 7B+ model)
DUO_STEPS, DUO_STEPS_GPU, DUO_LR, DUO_L1 = 40, 400, 0.1, 0.05
DUO_ANSWER_TOKENS = 16  # room kept after each passkey prompt for its teacher-forced answer


def passkey_sequences(tokenizer, length: int, count: int, seed: int) -> List[tuple]:
    """``count`` passkey-retrieval sequences of at most ``length`` tokens: ``dash.ruler``'s passkey prompt followed by
    its answer (teacher-forced). Returns (ids [T], start) pairs; hidden states from ``start`` on (the position that
    predicts the answer's first token, through the end) form the answer span the gate is trained on."""
    from .ruler import generate_samples

    if tokenizer is None:
        raise ValueError("selector 'duo_gate' needs the tokenizer (tokenizer=...) to build its passkey samples")
    try:  # passkey samples draw no words from the vocabulary: an empty list skips scanning it
        samples = generate_samples(tokenizer, "passkey", length - DUO_ANSWER_TOKENS, count, seed, words=[])
    except ValueError as exc:
        raise ValueError(f"selector 'duo_gate' builds passkey samples as long as the calibration rows ({length} "
                         f"tokens), which is too short: {exc}") from exc
    out = []
    for sample in samples:
        # answer ids appended to the prompt's own ids: exactly what the model sees when it generates the answer
        prompt = list(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
        answer = list(tokenizer(f" {sample.answers[0]}.", add_special_tokens=False)["input_ids"])
        ids = (prompt + answer)[:length]
        out.append((torch.tensor(ids, dtype=torch.long), len(prompt) - 1))
    return out


def _duo_gate(net: Supernet, sequences: Sequence[tuple], full: int, eff: int) -> List[List[float]]:
    """Per layer and KV-head group, the learned gate of full attention (DuoAttention's objective)."""
    from torch import nn

    saved = [s.alpha for s in net.states]  # the Parameter objects themselves go back (an optimizer may hold them)
    taus = [s.tau for s in net.states]
    device = saved[0].device
    gates = []
    for state in net.states:
        # [Hkv, C] logits: a per-group two-way gate sigmoid(a_full - a_eff) with a_eff fixed at 0, every other
        # candidate off; DashLayerState expands groups to query heads like any per-group supernet
        alpha = torch.full((state.heads_kv, len(state.candidates)), -1e4, device=device)
        alpha[:, full] = 0.0
        alpha[:, eff] = 0.0
        mask = torch.zeros_like(alpha)
        mask[:, full] = 1.0
        gate = nn.Parameter(alpha)
        gate.register_hook(lambda grad, mask=mask: grad * mask)  # only a_full trains: one logit per gate
        state.alpha = gate
        state.tau = 1.0
        gates.append(gate)
    optimizer = torch.optim.Adam(gates, lr=DUO_LR)
    base = net.model.base_model
    try:
        for ids, start in sequences:
            ids = ids[None].to(device)
            with torch.no_grad(), net.teacher():
                target = base(ids, use_cache=False).last_hidden_state[0, start:].float()
            hidden = base(ids, use_cache=False).last_hidden_state[0, start:].float()
            values = torch.cat([s.probabilities()[:, full] for s in net.states])
            loss = (hidden - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12) + DUO_L1 * values.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return [s.probabilities()[:, full].detach().cpu().tolist() for s in net.states]
    finally:
        for state, alpha, tau in zip(net.states, saved, taus):
            state.alpha = alpha
            state.tau = tau


def select(net: Supernet, method: str, budget: int, efficient: Candidate, rows: Optional[torch.Tensor] = None,
           seed: int = 0, tokenizer=None, answers: Optional[torch.Tensor] = None, answer_weight: float = 1.0) -> Dict:
    """Layers that keep full attention under ``method``; returns {"full_layers", "choices", "scores", "cost"}
    (duo_gate also "gates": per layer, the gate of each KV-head group).

    ``rows``: [N, T] calibration token rows (needed by ppl_drop, attn_mse, kl_restore; duo_gate uses only their
    length T). ``tokenizer``: the model's tokenizer (needed by duo_gate for its passkey samples). ``answers``:
    the rows' [N, T] answer mask, if any: ppl_drop and kl_restore then weight the answer tokens (module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown selector {method!r}; known: {list(METHODS)}")
    num_layers = len(net.states)
    if not 0 <= budget <= num_layers:
        raise ValueError(f"budget must be between 0 and {num_layers} full-attention layers, got {budget}")
    full, eff = _positions(net, efficient)
    scored = method in ("ppl_drop", "attn_mse", "kl_restore", "duo_gate")
    if scored and (rows is None or rows.numel() == 0):
        raise ValueError(f"selector {method!r} needs calibration rows")
    if answers is not None and (rows is None or answers.shape != rows.shape):
        expected = None if rows is None else tuple(rows.shape)
        raise ValueError(f"answers must be a mask of the calibration rows' shape {expected}, "
                         f"got {tuple(answers.shape)}")
    weights = calibration_weights(answers, answer_weight)
    started = time.time()
    scores: Optional[List[float]] = None
    gates: Optional[List[List[float]]] = None
    tokens = int(rows.numel()) if scored else 0
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
            scores.append(_loss(net, rows, None, "nll", weights))
    elif method == "kl_restore":
        teacher_hidden = teacher_hidden_states(net, rows)
        set_choices(net, [eff] * num_layers)
        base = _loss(net, rows, teacher_hidden, "kl", weights)
        scores = []
        for layer in range(num_layers):
            set_choices(net, [full if i == layer else eff for i in range(num_layers)])
            scores.append(base - _loss(net, rows, teacher_hidden, "kl", weights))  # KL removed by restoring this layer
    elif method == "duo_gate":
        on_gpu = next(net.model.parameters()).device.type == "cuda"
        duo_steps = DUO_STEPS_GPU if on_gpu else DUO_STEPS
        sequences = passkey_sequences(tokenizer, int(rows.shape[1]), duo_steps, seed)
        gates = _duo_gate(net, sequences, full, eff)
        scores = [sum(g) / len(g) for g in gates]  # a layer's rank: its mean gate over KV-head groups
        tokens = sum(int(ids.numel()) for ids, _ in sequences)
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
    # forward passes over the rows (duo_gate: teacher and mixed model over each passkey sample, once)
    passes = {"ppl_drop": num_layers, "kl_restore": num_layers + 2, "attn_mse": 1, "duo_gate": 2}.get(method, 0)
    cost = {"forward_tokens": tokens * passes, "seconds": time.time() - started}
    if method == "duo_gate":  # the mixed model also runs backward over each sample
        cost.update(backward_tokens=tokens, passkey_samples=len(sequences))
    out = {"method": method, "budget": budget, "seed": seed, "full_layers": keep, "choices": choices,
           "scores": scores, "cost": cost}
    if gates is not None:
        out["gates"] = gates
    return out
