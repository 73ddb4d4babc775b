"""Shared test helpers: random inputs, a brute-force fp64 oracle, error metrics."""
import math

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in result"
    # The floor, an RMS of 0.1 (the scale of these tests' unit-variance inputs' gradients), judges exactly-zero
    # references (dk at T = 1: one key, so dS = P (dP - delta) = 0 up to rounding) by fp32 rounding of O(1) terms
    # rather than dividing by zero; at 1e-2 such a case passed or failed with the interpreter's numpy version.
    return ((a - b).norm() / b.norm().clamp_min(1e-1 * b.numel() ** 0.5)).item()


def make_inputs(batch, seq, heads_q, heads_kv, head_dim, num_c, *, per_head=False, dtype=torch.float32,
                device="cpu", seed=0, non_contiguous=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if non_contiguous:
        # [B, H, T, D] storage seen as [B, T, H, D]: strided like a transposed projection output
        q = rnd(batch, heads_q, seq, head_dim).transpose(1, 2)
        k = rnd(batch, heads_kv, seq, head_dim).transpose(1, 2)
        v = rnd(batch, heads_kv, seq, head_dim).transpose(1, 2)
    else:
        q, k, v = rnd(batch, seq, heads_q, head_dim), rnd(batch, seq, heads_kv, head_dim), rnd(batch, seq, heads_kv, head_dim)
    w_shape = (heads_q, num_c) if per_head else (num_c,)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.randn(*w_shape, generator=gen).softmax(-1).to(device=device, dtype=w_dtype)
    for t in (q, k, v, weights):
        t.requires_grad_(True)
    return q, k, v, weights


def brute_force(q, k, v, weights, windows, sinks, scale=None):
    """Element-by-element fp64 definition of the op, independent of the reference's masking code."""
    q, k, v, weights = (t.detach().double() for t in (q, k, v, weights))
    batch, seq, heads_q, head_dim = q.shape
    group = heads_q // k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    sinks = sinks or [0] * len(windows)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads_q):
            for t in range(seq):
                for c, (win, sink) in enumerate(zip(windows, sinks)):
                    keys = [j for j in range(t + 1) if win is None or t - j < win or j < sink]
                    s = torch.stack([q[b, t, h] @ k[b, j, h // group] for j in keys]) * scale
                    p = torch.softmax(s, 0)
                    o = sum(p[i] * v[b, j, h // group] for i, j in enumerate(keys))
                    w = weights[c] if weights.dim() == 1 else weights[h, c]
                    out[b, t, h] += w * o
    return out



class WordTokenizer:
    """One token a (space-prefixed) word, ids within a tiny model's 97-token vocabulary (a stable hash; 0 = EOS):
    short sequences for the RULER generators and the passkey samples on a tiny model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        import re
        import zlib

        ids = [1 + zlib.crc32(piece.encode()) % 96 for piece in re.findall(r"\s*\S+|\s+", text)]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):  # not invertible: ids as words (enough to score a sample)
        return " ".join(str(int(i)) for i in ids)


class TextTokenizer:
    """An invertible word-level tokenizer for dash.data's retrieval rows without a real one: one id a
    (space-prefixed) piece, from a stable hash (0 = EOS); ``decode`` joins the pieces back into the text; the
    vocabulary: 720 made-up plain words (``dash.data.vocabulary_words``)."""

    eos_token_id = 0

    def __init__(self):
        self.pieces = {0: ""}

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        import re
        import zlib

        ids = []
        for piece in re.findall(r"\s*\S+|\s+", text):
            ids.append(1 + zlib.crc32(piece.encode()) % 2_000_000_000)
            self.pieces.setdefault(ids[-1], piece)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[int(i)] for i in ids)

    def get_vocab(self):
        from itertools import product

        words = ["".join(p) for p in product("bdfgklmnprst", "aeiou", "bdfgklmnprst")]
        return {w: i for i, w in enumerate(words)}
