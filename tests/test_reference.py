import pytest
import torch

from dash_kernels import mixed_attention_reference
from helpers import brute_force, make_inputs, rel_err

CASES = [
    # (B, T, Hq, Hkv, D, windows, sinks, per_head)
    (1, 1, 2, 1, 8, [1, None], [1, 0], False),
    (2, 9, 4, 2, 8, [None, 3, 1, 20], [0, 1, 2, 0], True),
    (1, 13, 6, 2, 4, [5, 5, None], [0, 3, 0], False),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case):
    batch, seq, hq, hkv, d, windows, sinks, per_head = case
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=torch.float64)
    ref = mixed_attention_reference(q, k, v, w, windows, sinks)
    assert rel_err(ref, brute_force(q, k, v, w, windows, sinks)) < 1e-12


def test_reference_scale_argument():
    q, k, v, w = make_inputs(1, 7, 2, 1, 8, 2, dtype=torch.float64)
    ref = mixed_attention_reference(q, k, v, w, [2, None], scale=0.3)
    assert rel_err(ref, brute_force(q, k, v, w, [2, None], None, scale=0.3)) < 1e-12


def test_reference_gradcheck():
    q, k, v, w = make_inputs(1, 6, 4, 2, 4, 3, per_head=True, dtype=torch.float64)

    def fn(q, k, v, w):
        return mixed_attention_reference(q, k, v, w, [2, None, 1], [1, 0, 2])

    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_reference_keeps_dtype_and_low_precision_mode():
    q, k, v, w = make_inputs(1, 5, 2, 2, 8, 1, dtype=torch.bfloat16)
    assert mixed_attention_reference(q, k, v, w, [None]).dtype == torch.bfloat16
    assert mixed_attention_reference(q, k, v, w, [None], upcast=False).dtype == torch.bfloat16
