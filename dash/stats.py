"""How sure a RULER comparison is: paired bootstrap intervals from per-sample scores.

RULER samples are a pure function of (task, length, index, seed), so sample i of a (task, length) cell is the
same prompt for every hybrid scored with the same seed: two hybrids' scores are paired sample by sample. The
RULER average is the mean over tasks and lengths of each cell's mean score; the bootstrap resamples the sample
indices within each cell, the same indices for both hybrids, and recomputes the difference of the averages.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np  # a dependency of matplotlib, which dash already needs

RESAMPLES = 2000
CONFIDENCE = 0.95

Cells = Dict[Tuple[str, str], np.ndarray]  # (task, length as a string) -> per-sample scores, in sample order


def per_sample_scores(records: Sequence[Dict], digits: int = 4) -> Dict[str, Dict[str, List[float]]]:
    """``ruler.evaluate``'s records as {task: {str(length): [score of sample 0, 1, ...]}}, rounded (small JSON)."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for record in records:  # evaluate writes them in sample order within each (task, length)
        out.setdefault(record["task"], {}).setdefault(str(record["length"]), []).append(round(record["score"], digits))
    return out


def cell_scores(rows: Sequence[Dict]) -> Optional[Cells]:
    """The per-sample scores of one method at one budget, averaged over its rows (random's seeds) sample by
    sample; None when a row lacks them (files written before they were kept) or the rows disagree in shape."""
    if not rows or any(not row.get("ruler_samples") for row in rows):
        return None
    stacked: Dict[Tuple[str, str], List[np.ndarray]] = {}
    for row in rows:
        cells = {(task, length): np.asarray(scores, dtype=np.float64)
                 for task, by_length in row["ruler_samples"].items() for length, scores in by_length.items()}
        if stacked and (cells.keys() != stacked.keys()
                        or any(cells[c].shape != stacked[c][0].shape for c in cells)):
            return None
        for cell, scores in cells.items():
            stacked.setdefault(cell, []).append(scores)
    if any(len(scores[0]) == 0 for scores in stacked.values()):
        return None
    return {cell: np.mean(scores, axis=0) for cell, scores in stacked.items()}


def average(cells: Cells) -> float:
    """The RULER average of per-sample scores (every task has every length: the mean of the cell means)."""
    return float(np.mean([scores.mean() for scores in cells.values()]))


def standard_error(cells: Cells) -> float:
    """The standard error of the RULER average from the spread of the samples within each cell."""
    variance = sum(scores.var(ddof=1) / len(scores) for scores in cells.values() if len(scores) > 1)
    return math.sqrt(variance) / len(cells)


def paired_difference(a: Optional[Cells], b: Optional[Cells], *, resamples: int = RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0) -> Optional[Dict]:
    """RULER average of ``a`` minus that of ``b`` and its percentile bootstrap interval, resampling sample
    indices within each cell with the same indices for both (paired). None when either lacks per-sample
    scores or they were not measured on the same cells and sample counts."""
    if a is None or b is None or not a or a.keys() != b.keys() or any(a[c].shape != b[c].shape for c in a):
        return None
    rng = np.random.default_rng(seed)  # fixed: the same table every time it is written
    resampled = np.zeros(resamples)
    for cell in sorted(a):  # a fixed order: the draws do not depend on dict order
        difference = a[cell] - b[cell]
        indices = rng.integers(0, len(difference), size=(resamples, len(difference)))
        resampled += difference[indices].mean(axis=1)
    resampled /= len(a)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return {"difference": average(a) - average(b), "low": float(low), "high": float(high),
            "excludes_zero": bool(low > 0 or high < 0), "confidence": confidence, "resamples": resamples}
