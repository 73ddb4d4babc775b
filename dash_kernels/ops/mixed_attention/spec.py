"""Candidate sets: validation and the precomputed plan the kernels walk.

A candidate ``c = (W_c, S_c)`` lets query ``t`` see key ``j`` iff ``j <= t`` and
(``W_c is None`` or ``t - j < W_c`` or ``j < S_c``).

Kernels see the candidates sorted by window (full attention last), so that the
windows are nested suffixes of the keys. The (t, j) plane then splits into
*regions*: a band of distances ``t - j`` between two consecutive distinct
windows, crossed with a *sink level* (how many distinct sink sizes exceed ``j``).
Every element of a region is seen by the same set of candidates; the backward
pass needs one set of per-row coefficients per region.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

# "No window": larger than any distance an int32 index can hold.
FULL_WINDOW = 1 << 30
MAX_CANDIDATES = 16


@dataclass(frozen=True)
class CandidatePlan:
    """The candidate set in the form the kernels consume (all tuples of ints)."""

    windows: tuple  # user order, None for full causal
    sinks: tuple  # user order, 0 where no sink (always 0 for full candidates)
    order: tuple  # order[i] = user index of the i-th candidate by window
    sorted_windows: tuple  # FULL_WINDOW for full causal
    sorted_sinks: tuple
    band_edges: tuple  # distinct finite windows, ascending
    sink_edges: tuple  # distinct positive sinks of windowed candidates, ascending
    membership: tuple  # [R][C]: 1 if sorted candidate c sees region r

    @property
    def num_candidates(self) -> int:
        return len(self.windows)

    @property
    def num_regions(self) -> int:
        return (len(self.band_edges) + 1) * (len(self.sink_edges) + 1)

    @property
    def max_window(self) -> int:
        return max(self.sorted_windows)

    @property
    def max_sink(self) -> int:
        return max(self.sorted_sinks)

    @property
    def encoded_windows(self) -> list:
        """Windows as plain ints (0 for full) for a torch.library schema."""
        return [0 if w is None else w for w in self.windows]

    def table(self) -> list:
        """Flat int table read by the Triton kernels (see ``_cand_*`` helpers there)."""
        return [
            *self.sorted_windows,
            *self.sorted_sinks,
            *self.band_edges,
            *self.sink_edges,
            self.max_window,
            self.max_sink,
        ]


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value >= FULL_WINDOW:
        raise ValueError(f"{name} must be < {FULL_WINDOW}, got {value}")
    return value


def normalize_candidates(windows, sinks=None) -> tuple:
    """Validate user ``windows``/``sinks``; returns (windows, sinks) as tuples.

    ``windows`` entries are ints >= 1 or None (full causal); ``sinks`` is None or
    one int >= 0 per window. A full candidate's sink is meaningless and becomes 0.
    """
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise TypeError(
            f"windows must be a sequence of ints >= 1 or None, got {type(windows).__name__}"
        )
    if len(windows) == 0:
        raise ValueError("windows must name at least one candidate, got an empty sequence")
    if len(windows) > MAX_CANDIDATES:
        raise ValueError(f"windows may hold at most {MAX_CANDIDATES} candidates, got {len(windows)}")
    norm_w = tuple(None if w is None else _check_int(w, f"windows[{i}]", 1) for i, w in enumerate(windows))
    if sinks is None:
        norm_s = (0,) * len(norm_w)
    else:
        if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence):
            raise TypeError(f"sinks must be None or a sequence of ints >= 0, got {type(sinks).__name__}")
        if len(sinks) != len(norm_w):
            raise ValueError(
                f"sinks must have one entry per window: got {len(sinks)} sinks for {len(norm_w)} windows"
            )
        norm_s = tuple(_check_int(s, f"sinks[{i}]", 0) for i, s in enumerate(sinks))
    norm_s = tuple(0 if w is None else s for w, s in zip(norm_w, norm_s))
    return norm_w, norm_s


@functools.lru_cache(maxsize=256)
def _plan(windows: tuple, sinks: tuple) -> CandidatePlan:
    key = [FULL_WINDOW if w is None else w for w in windows]
    order = tuple(sorted(range(len(windows)), key=lambda i: (key[i], sinks[i])))
    sorted_windows = tuple(key[i] for i in order)
    sorted_sinks = tuple(sinks[i] for i in order)
    band_edges = tuple(sorted({w for w in sorted_windows if w < FULL_WINDOW}))
    sink_edges = tuple(sorted({s for s in sorted_sinks if s > 0}))
    ns = len(sink_edges)
    membership = []
    for band in range(len(band_edges) + 1):
        band_lo = 0 if band == 0 else band_edges[band - 1]  # every distance in the band is >= band_lo
        for level in range(ns + 1):
            # keys of sink level g satisfy j < sink_edges[ns - g] (the g-th largest edge)
            sink_hi = 0 if level == 0 else sink_edges[ns - level]
            membership.append(
                tuple(int(w > band_lo or s >= sink_hi > 0) for w, s in zip(sorted_windows, sorted_sinks))
            )
    return CandidatePlan(
        windows=windows,
        sinks=sinks,
        order=order,
        sorted_windows=sorted_windows,
        sorted_sinks=sorted_sinks,
        band_edges=band_edges,
        sink_edges=sink_edges,
        membership=tuple(membership),
    )


def make_plan(windows, sinks=None) -> CandidatePlan:
    return _plan(*normalize_candidates(windows, sinks))


def decode_windows(encoded: Sequence[int]) -> tuple:
    """Inverse of ``CandidatePlan.encoded_windows`` (0 -> None)."""
    return tuple(None if int(w) == 0 else int(w) for w in encoded)


def candidate_mask(t_idx, j_idx, window: Optional[int], sink: int):
    """Boolean mask of candidate (window, sink) for broadcastable index tensors."""
    keep = j_idx <= t_idx
    if window is not None:
        near = (t_idx - j_idx) < window
        if sink > 0:
            near = near | (j_idx < sink)
        keep = keep & near
    return keep
