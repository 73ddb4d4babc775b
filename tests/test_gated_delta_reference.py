"""Chunked PyTorch gated delta rule vs the step-by-step definition: output, final state, every gradient."""
import pytest
import torch
import torch.nn.functional as F

from dash_kernels import gated_delta_rule
from dash_kernels.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent
from helpers import rel_err


def _inputs(b, t, h, kd, vd, seed=0, dtype=torch.float64, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, kd, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(b, t, h, kd, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, t, h, vd, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=dtype) * (6.0 if strong_decay else 1.0) + 2.0)
    beta = torch.rand(b, t, h, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, kd, vd, generator=gen, dtype=dtype)
    return [x.requires_grad_(True) for x in (q, k, v, g, beta, s0)]


@pytest.mark.parametrize("shape", [(1, 1, 2, 8, 8), (2, 37, 3, 8, 12), (1, 70, 2, 16, 8)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(shape, with_state):
    q, k, v, g, beta, s0 = _inputs(*shape, strong_decay=shape[1] == 70)
    init = s0 if with_state else None
    o1, f1 = gated_delta_chunked(q, k, v, g, beta, initial_state=init, output_final_state=True, chunk_size=16)
    o2, f2 = gated_delta_recurrent(q, k, v, g, beta, initial_state=init, output_final_state=True)
    assert rel_err(o1, o2) < 1e-9 and rel_err(f1, f2) < 1e-9
    do, df = torch.randn_like(o1), torch.randn_like(f1)
    inputs = [q, k, v, g, beta] + ([s0] if with_state else [])
    g1 = torch.autograd.grad((o1 * do).sum() + (f1 * df).sum(), inputs)
    g2 = torch.autograd.grad((o2 * do).sum() + (f2 * df).sum(), inputs)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), g1, g2):
        assert rel_err(a, b) < 1e-8, name


def test_beta_zero_keeps_the_state_and_beta_one_overwrites():
    q, k, v, g, beta, s0 = (t.detach().float() for t in _inputs(1, 1, 1, 8, 4))
    _, kept = gated_delta_rule(q, k, v, torch.zeros_like(g), torch.zeros_like(beta), initial_state=s0,
                               output_final_state=True, scale=1.0)
    assert torch.allclose(kept, s0)
    # beta = 1 with a unit key: the state's value along k becomes v exactly
    _, written = gated_delta_rule(q, k, v, torch.zeros_like(g), torch.ones_like(beta), initial_state=s0,
                                  output_final_state=True)
    assert torch.allclose(torch.einsum("bhkv,bhk->bhv", written, k[:, 0]), v[:, 0], atol=1e-5)


def test_public_op_dtype_and_errors():
    q, k, v, g, beta, _ = (t.detach().float() for t in _inputs(1, 20, 2, 8, 8))
    o, final = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), beta.bfloat16())
    assert o.dtype == torch.bfloat16 and final is None
    with pytest.raises(ValueError, match="g must be \\[B, T, H\\]"):
        gated_delta_rule(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="log-decay"):
        gated_delta_rule(q, k, v, g.abs() + 0.1, beta)
    with pytest.raises(TypeError, match="beta must be float16"):
        gated_delta_rule(q, k, v, g, beta.long())
    with pytest.raises(ValueError, match="backend must be"):
        gated_delta_rule(q, k, v, g, beta, backend="cuda")
