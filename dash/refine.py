"""Discrete refinement of a searched hybrid: swap full-attention layers while the search's own objective drops.

The search optimises a continuous relaxation (each layer a softmax mixture of its candidates) and the export
keeps the K layers most likely to be full. The relaxation and the discrete hybrid can rank layers differently
(the discretisation gap of differentiable architecture search): a layer that looks dispensable inside a mixture
can matter once its neighbours are hard choices. The refinement measures the discrete hybrid itself: it starts
from the searched choice and, per round, tries every swap of a full layer with a non-full one (the full layer
takes the other's candidate), scoring KL(teacher || hybrid) on calibration rows, the search's loss; it takes
the best swap if it lowers the KL, and stops when none does or after ``rounds``. The budget and the multiset
of efficient candidates are unchanged, so the hybrid's cache is the same.

Cost: one teacher pass over the rows, then K * (L - K) + 1 hybrid passes a round (SmolLM2, K 9, 64K tokens of
calibration: 190 passes a round, as many tokens as the search; minutes on a GPU). With ``checkpoint`` each
hybrid's KL is kept in a JSON file as it is measured, so an interrupted refinement resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Sequence

import torch

from .baselines import _loss, calibration_weights, set_choices, teacher_hidden_states
from .candidates import Candidate
from .data import tensor_digest
from .search import (ANSWER_OBJECTIVES, FIRST_WEIGHT_OBJECTIVES, OBJECTIVES, efficient_reference,
                     long_range_weights, prompt_answer_weights, save_json)
from .supernet import Supernet


def refine_full_layers(net: Supernet, choices: Sequence[Candidate], rows: torch.Tensor, rounds: int = 2,
                       tolerance: float = 1e-4, objective: str = "uniform",
                       answers: Optional[torch.Tensor] = None, answer_weight: float = 1.0,
                       answer_first_weight: float = 1.0, checkpoint: Optional[str] = None,
                       progress: bool = False) -> Dict:
    """The refined choice (list of Candidates), its KL and the searched one's, the swaps taken, and the cost.

    ``tolerance``: a swap must lower the KL by this fraction of it (rows are few: below that, noise).
    ``objective``: the search's token weighting of the KL (``dash.search``): with ``long_range`` each token's KL
    is weighted by the all-efficient model's KL there (one more pass over the rows), mean 1 over the rows; with
    ``answers`` the answer tokens (``answers``: the rows' answer mask) count ``answer_weight`` more, as a whole;
    with ``answers_nll`` the answers' NLL, averaged per prompt (a run of answer positions in a row; each prompt's
    first position ``answer_first_weight`` times another, ``dash.search.prompt_answer_weights``), counts
    ``answer_weight`` beside the mean KL; ``answers_margin`` weighs each answer token's greedy-margin shortfall
    from the teacher's (``dash.search.answer_margin_shortfall``) in the NLL's place, as the search does.
    ``checkpoint``: a JSON file of the KLs measured so far (kept only for the same rows, objective and
    candidates); a rerun reads it and measures only the hybrids it lacks. The cost counts every pass, those of
    earlier runs included, so a resumed refinement reports what an uninterrupted one would."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if answer_first_weight != 1.0 and objective not in FIRST_WEIGHT_OBJECTIVES:
        raise ValueError(f"answer_first_weight {answer_first_weight} weights only the {FIRST_WEIGHT_OBJECTIVES} "
                         f"objectives, not {objective!r}: leave it at 1.0")
    if rows is None or rows.numel() == 0:
        raise ValueError("refinement needs calibration rows")
    answer_objective = objective in ANSWER_OBJECTIVES
    if answer_objective and (answers is None or answers.shape != rows.shape):
        raise ValueError(f"objective '{objective}' needs the rows' answer mask, of shape {tuple(rows.shape)}")
    names = [c.name for c in net.candidates]
    if len(choices) != len(net.states):
        raise ValueError(f"choices has {len(choices)} entries, the model {len(net.states)} layers")
    unknown = [c.name for c in choices if c.name not in names]
    if unknown:
        raise ValueError(f"choices name candidates {unknown} that the supernet lacks ({names})")
    started = time.time()
    key = {"rows": tensor_digest(rows, answers if answer_objective else None), "objective": objective,
           "answer_weight": answer_weight if answer_objective else None, "candidates": names}
    if answer_first_weight != 1.0:  # (keys of the default stay those of earlier checkpoints)
        key["answer_first_weight"] = answer_first_weight
    measured, earlier_seconds = _read_checkpoint(checkpoint, key)
    teacher = teacher_hidden_states(net, rows)
    passes = 1
    weights = label_weights = None
    if objective == "long_range":
        head = net.model.get_output_embeddings()
        with torch.no_grad(), net.fixed(efficient_reference(net)):
            efficient = [net.model.base_model(row[None], use_cache=False).last_hidden_state[0] for row in rows]
        flat = long_range_weights(torch.stack(efficient), torch.stack(teacher), head, 1024)
        weights = list(flat.view(rows.shape[0], -1))  # mean 1 over all the rows' tokens
        passes += 1
    elif objective == "answers":
        weights = calibration_weights(answers, answer_weight)
    elif objective in FIRST_WEIGHT_OBJECTIVES:  # answers_nll, answers_margin: a term per answer label
        label_weights = list(prompt_answer_weights(answers, answer_weight, answer_first_weight))
    margin = objective == "answers_margin"

    from tqdm.auto import tqdm

    full_count = sum(c.is_full for c in choices)
    bar = tqdm(total=1 + rounds * full_count * (len(choices) - full_count), disable=not progress, unit="hybrid",
               desc="refine")

    def kl(choice: Sequence[Candidate]) -> float:
        nonlocal passes
        passes += 1
        label = ",".join(c.name for c in choice)
        if label not in measured:
            set_choices(net, [names.index(c.name) for c in choice])
            measured[label] = _loss(net, rows, teacher, "kl", weights, label_weights, margin)
            if checkpoint:
                save_json(checkpoint, {"key": key, "kl": measured,
                                       "seconds": earlier_seconds + time.time() - started})
        bar.update(1)
        return measured[label]

    current = list(choices)
    searched = best = kl(current)
    swaps = []
    for _ in range(rounds):
        full = [i for i, c in enumerate(current) if c.is_full]
        other = [i for i, c in enumerate(current) if not c.is_full]
        move, move_kl = None, best
        for f in full:
            for o in other:
                trial = list(current)
                trial[f], trial[o] = current[o], current[f]
                value = kl(trial)
                if value < move_kl:
                    move, move_kl = (f, o), value
        if move is None or move_kl > best * (1 - tolerance):
            break
        f, o = move
        current[f], current[o] = current[o], current[f]
        swaps.append({"now_full": o, "now_efficient": f, "its_candidate": current[f].name, "kl": move_kl})
        best = move_kl
    bar.close()
    tokens = int(rows.numel())
    return {"choices": current, "kl": best, "searched_kl": searched, "swaps": swaps,
            "cost": {"forward_tokens": tokens * passes, "seconds": earlier_seconds + time.time() - started}}


def _read_checkpoint(path: Optional[str], key: Dict):
    """The KLs a checkpoint holds for this key ({} for another key or none) and the seconds spent on them."""
    if not path or not os.path.exists(path):
        return {}, 0.0
    with open(path) as f:
        saved = json.load(f)
    if saved.get("key") != key:  # other rows, objective or candidates: measure again
        return {}, 0.0
    return dict(saved["kl"]), float(saved.get("seconds", 0.0))

