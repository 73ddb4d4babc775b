"""Softmax-family candidate operators of a DASH layer and their defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence


LINEAR_KINDS = ("gla", "gdn")
KINDS = ("softmax",) + LINEAR_KINDS


@dataclass(frozen=True)
class Candidate:
    """One attention operator of a layer.

    ``kind="softmax"``: full causal (window None), sliding window, or sinks + window.
    ``kind="gla"`` / ``"gdn"``: teacher-aligned gated linear attention / gated delta rule (dash/linear.py);
    no window or sink.
    """

    window: Optional[int] = None
    sink: int = 0
    kind: str = "softmax"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Candidate.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "softmax" and (self.window is not None or self.sink):
            raise ValueError(f"a linear ({self.kind}) candidate has no window or sink")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"Candidate.window must be None or an int >= 1, got {self.window!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"Candidate.sink must be an int >= 0, got {self.sink!r}")
        if self.window is None and self.sink:
            raise ValueError("a full-attention candidate cannot have sinks (it already sees every key)")

    @property
    def is_linear(self) -> bool:
        return self.kind != "softmax"

    @property
    def is_full(self) -> bool:
        return self.kind == "softmax" and self.window is None

    @property
    def name(self) -> str:
        if self.is_linear:
            return self.kind
        if self.window is None:
            return "full"
        return f"sink{self.sink}_swa{self.window}" if self.sink else f"swa{self.window}"

    @classmethod
    def parse(cls, spec) -> "Candidate":
        """From a name ('full', 'swa512', 'sink64_swa512'), a dict ({window, sink}) or a Candidate."""
        if isinstance(spec, Candidate):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - {"window", "sink", "kind"}
            if unknown:
                raise ValueError(f"unknown candidate keys {sorted(unknown)}; expected 'window', 'sink', 'kind'")
            return cls(window=spec.get("window"), sink=spec.get("sink", 0), kind=spec.get("kind", "softmax"))
        if isinstance(spec, str):
            text = spec.strip().lower()
            if text == "full":
                return cls()
            if text in LINEAR_KINDS:
                return cls(kind=text)
            sink = 0
            if text.startswith("sink"):
                head, _, text = text.partition("_")
                sink = _parse_int(head[4:], spec)
            if text.startswith("swa"):
                return cls(window=_parse_int(text[3:], spec), sink=sink)
        raise ValueError(f"cannot parse candidate {spec!r}: use 'full', 'swa<W>', 'sink<S>_swa<W>', 'gla', 'gdn' or a dict")

    def to_dict(self) -> dict:
        return asdict(self)


def _parse_int(text: str, spec) -> int:
    if not text.isdigit():
        raise ValueError(f"cannot parse candidate {spec!r}: expected digits, got {text!r}")
    return int(text)


def default_candidates(max_context: int) -> list:
    """Full attention, SWA at 1/16 and 1/4 of the context, and 64 sinks + the small window.

    For an 8K model: full, swa512, swa2048, sink64_swa512 (the set DASH's design notes measure).
    Windows are powers of two, at least 64 and below the context.
    """
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")

    def pow2_at_most(x: int) -> int:
        return 1 << max(0, int(x).bit_length() - 1)

    small = max(64, pow2_at_most(max_context // 16))
    large = max(small * 2, pow2_at_most(max_context // 4))
    out = [Candidate()]
    for window in (small, large):
        if window < max_context:
            out.append(Candidate(window=window))
    if small < max_context:
        out.append(Candidate(window=small, sink=min(64, small)))
    return out


def parse_candidates(specs: Sequence) -> list:
    if not specs:
        raise ValueError("at least one candidate is needed")
    cands = [Candidate.parse(s) for s in specs]
    if len(set(cands)) != len(cands):
        raise ValueError(f"duplicate candidates in {[c.name for c in cands]}")
    if all(c.is_linear for c in cands):
        raise ValueError("at least one softmax-family candidate is needed")
    return cands
