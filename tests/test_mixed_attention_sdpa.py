"""The "sdpa" backend (one scaled_dot_product_attention per candidate, the CPU path of "auto") vs the reference:
forward and every gradient at the Triton tests' awkward shapes, bf16 judged against a plain bf16 implementation,
and the skipping of zero-weight candidates in a fixed hybrid."""
import pytest
import torch

from dash_kernels import mixed_attention, mixed_attention_reference
from dash_kernels.ops.mixed_attention import sdpa
from helpers import make_inputs, rel_err
from test_mixed_attention_triton import CASES


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_matches_reference(name):
    batch, seq, hq, hkv, d, windows, sinks, per_head = CASES[name]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, non_contiguous=True)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="sdpa", scale=0.7)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (q, k, v, w), dy)
    y_ref = mixed_attention_reference(q, k, v, w, windows, sinks, scale=0.7)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v, w), dy)
    for label, got, want in zip(("y", "dq", "dk", "dv", "dw"), (y, *grads), (y_ref, *grads_ref)):
        assert got.shape == want.shape and got.dtype == want.dtype, label
        assert rel_err(got, want) < 2e-5, (label, rel_err(got, want))


def test_sdpa_bf16_error_within_a_plain_bf16_implementation():
    windows, sinks = [None, 7, 20, 3], [0, 0, 1, 4]
    q, k, v, w = make_inputs(1, 53, 6, 2, 32, 4, per_head=True, dtype=torch.bfloat16)
    exact = mixed_attention_reference(q.float(), k.float(), v.float(), w, windows, sinks)
    plain = mixed_attention_reference(q, k, v, w, windows, sinks, upcast=False)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="sdpa")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, exact) <= 2 * rel_err(plain, exact) + 1e-3


def test_auto_on_cpu_takes_sdpa_and_skips_zero_weights(monkeypatch):
    q, k, v, _ = make_inputs(2, 30, 4, 2, 16, 3)
    windows, sinks = [None, 5, 9], [0, 1, 0]
    calls = []
    real = sdpa.F.scaled_dot_product_attention
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        y = mixed_attention(q, k, v, one_hot, windows, sinks)
    assert len(calls) == 1 and calls[0]["attn_mask"] is not None  # only the window-5 candidate ran
    assert rel_err(y, mixed_attention_reference(q, k, v, one_hot, windows, sinks)) < 2e-5
    # with a gradient wanted, a zero weight still has one: every candidate runs
    calls.clear()
    w = one_hot.clone().requires_grad_(True)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="sdpa")
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    (dw_ref,) = torch.autograd.grad(mixed_attention_reference(q, k, v, w, windows, sinks).sum(), (w,))
    assert len(calls) == 3 and rel_err(dw, dw_ref) < 2e-5
