"""Triton gated delta rule (chunked WY kernels) vs the step-by-step definition: output, state, every gradient.

Without a GPU these run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) with 16-token chunks.
"""
import pytest
import torch
import torch.nn.functional as F

from dash_kernels import gated_delta_rule
from dash_kernels.ops.gated_delta import gated_delta_recurrent
from helpers import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = {
    # name: (B, T, H, K, V)
    "t1": (1, 1, 2, 16, 16),
    "k_ne_v_odd_t": (2, 37, 2, 16, 24),
    "several_value_tiles": (1, 40, 2, 32, 80),  # value tiles' partial sums meet in the per-chunk kernel
}


def _inputs(b, t, h, kd, vd, dtype=torch.float32, seed=0, strong_decay=False, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    if non_contiguous:
        q, k, v = (rnd(b, h, t, d).transpose(1, 2) for d in (kd, kd, vd))
    else:
        q, k, v = rnd(b, t, h, kd), rnd(b, t, h, kd), rnd(b, t, h, vd)
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(rnd(b, t, h) * (6.0 if strong_decay else 1.0) + 2.0)
    beta = torch.rand(b, t, h, generator=gen)
    s0 = rnd(b, h, kd, vd)
    return [x.to(device=DEVICE, dtype=dtype).requires_grad_(True) for x in (q, k, v, g, beta)] + \
        [s0.to(DEVICE).requires_grad_(True)]


def _check(q, k, v, g, beta, s0, with_state, tol):
    init = s0 if with_state else None
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=init, output_final_state=True, backend="triton")
    o_ref, final_ref = gated_delta_recurrent(*(t.double() for t in (q, k, v, g, beta)),
                                             initial_state=None if init is None else init.double(),
                                             output_final_state=True)
    assert o.dtype == q.dtype and final.dtype == torch.float32
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    dfinal = torch.randn(final.shape, generator=torch.Generator().manual_seed(2)).to(final)
    inputs = [q, k, v, g, beta] + ([s0] if with_state else [])
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (final * dfinal).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * dfinal.double()).sum(), inputs)
    assert rel_err(o, o_ref) < tol and rel_err(final, final_ref) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_ref):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_matches_recurrent_definition(name, with_state):
    _check(*_inputs(*SHAPES[name], strong_decay=name == "k_ne_v_odd_t"), with_state, tol=1e-5)


def test_non_contiguous_inputs():
    _check(*_inputs(2, 23, 2, 16, 32, non_contiguous=True), True, tol=1e-5)


def test_bf16_inputs_fp32_state():
    _check(*_inputs(1, 40, 2, 32, 32, dtype=torch.bfloat16), True, tol=2e-2)


def test_strong_decay_and_full_writes():
    """beta = 1 with unit keys (I - k k^T singular) and log-decays down to -30 a step."""
    q, k, v, g, beta, s0 = _inputs(1, 35, 2, 16, 16)
    g = (g.detach() * 10 - 20 * torch.rand(g.shape, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    beta = torch.ones_like(beta).requires_grad_(True)
    _check(q, k, v, g, beta, s0, True, tol=1e-5)


def test_chunk_inverse_in_eight_blocks(monkeypatch):
    """The chunk inverse's other block count (a shorter chain of products, see _unit_lower_inverse), on the
    awkward shapes, and with nearly parallel keys, where a product formula on A itself would cancel badly."""
    from dash_kernels.ops.gated_delta import triton_chunk

    monkeypatch.setattr(triton_chunk, "INVERSE_BLOCKS", 8)
    for name in SHAPES:
        _check(*_inputs(*SHAPES[name]), True, tol=1e-5)
    q, k, v, g, beta, s0 = _inputs(1, 40, 1, 16, 8)
    base = torch.randn(16, generator=torch.Generator().manual_seed(9))
    k = F.normalize(base + 1e-3 * k.detach(), dim=-1).requires_grad_(True)
    beta = torch.ones_like(beta).requires_grad_(True)
    _check(q, k, v, g, beta, s0, True, tol=1e-5)
