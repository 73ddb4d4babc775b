"""Discrete refinement of a searched hybrid: swap full-attention layers while the search's own objective drops.

The search optimises a continuous relaxation (each layer a softmax mixture of its candidates) and the export
keeps the K layers most likely to be full. The relaxation and the discrete hybrid can rank layers differently
(the discretisation gap of differentiable architecture search): a layer that looks dispensable inside a mixture
can matter once its neighbours are hard choices. The refinement measures the discrete hybrid itself: it starts
from the searched choice and, per round, tries every swap of a full layer with a non-full one (the full layer
takes the other's candidate), scoring KL(teacher || hybrid) on calibration rows, the search's loss; it takes
the best swap if it lowers the KL, and stops when none does or after ``rounds``. The budget and the multiset
of efficient candidates are unchanged, so the hybrid's cache is the same.

Cost: one teacher pass over the rows, then K * (L - K) + 1 hybrid passes a round (SmolLM2, K 6, 16K tokens of
calibration: 145 passes, seconds on a GPU).
"""
from __future__ import annotations

import time
from typing import Dict, Sequence

import torch

from .baselines import _loss, set_choices, teacher_hidden_states
from .candidates import Candidate
from .supernet import Supernet


def refine_full_layers(net: Supernet, choices: Sequence[Candidate], rows: torch.Tensor, rounds: int = 2,
                       tolerance: float = 1e-4) -> Dict:
    """The refined choice (list of Candidates), its KL and the searched one's, the swaps taken, and the cost.

    ``tolerance``: a swap must lower the KL by this fraction of it (rows are few: below that, noise)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rows is None or rows.numel() == 0:
        raise ValueError("refinement needs calibration rows")
    names = [c.name for c in net.candidates]
    if len(choices) != len(net.states):
        raise ValueError(f"choices has {len(choices)} entries, the model {len(net.states)} layers")
    unknown = [c.name for c in choices if c.name not in names]
    if unknown:
        raise ValueError(f"choices name candidates {unknown} that the supernet lacks ({names})")
    started = time.time()
    teacher = teacher_hidden_states(net, rows)
    passes = 1

    def kl(choice: Sequence[Candidate]) -> float:
        nonlocal passes
        passes += 1
        set_choices(net, [names.index(c.name) for c in choice])
        return _loss(net, rows, teacher, "kl")

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
    tokens = int(rows.numel())
    return {"choices": current, "kl": best, "searched_kl": searched, "swaps": swaps,
            "cost": {"forward_tokens": tokens * passes, "seconds": time.time() - started}}
