"""Chunked PyTorch gated linear attention vs the step-by-step definition, every gradient."""
import pytest
import torch
import torch.nn.functional as F

from dash_kernels import gated_linear_attention
from dash_kernels.ops.gla import gla_chunked, gla_recurrent
from helpers import rel_err


def _inputs(b, t, h, kd, vd, seed=0, dtype=torch.float64, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, kd, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, t, h, vd, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(b, t, h, kd, generator=gen, dtype=dtype) * (6.0 if strong_decay else 1.0))
    s0 = torch.randn(b, h, kd, vd, generator=gen, dtype=dtype)
    return [x.requires_grad_(True) for x in (q, k, v, g, s0)]


@pytest.mark.parametrize("shape", [(1, 1, 2, 8, 8), (2, 37, 3, 8, 16), (1, 50, 2, 16, 8)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(shape, with_state):
    q, k, v, g, s0 = _inputs(*shape, strong_decay=shape[1] == 50)
    init = s0 if with_state else None
    o1, f1 = gla_chunked(q, k, v, g, initial_state=init, output_final_state=True, chunk_size=16)
    o2, f2 = gla_recurrent(q, k, v, g, initial_state=init, output_final_state=True)
    assert rel_err(o1, o2) < 1e-6 and rel_err(f1, f2) < 1e-6
    do, df = torch.randn_like(o1), torch.randn_like(f1)
    inputs = [q, k, v, g] + ([s0] if with_state else [])
    g1 = torch.autograd.grad((o1 * do).sum() + (f1 * df).sum(), inputs)
    g2 = torch.autograd.grad((o2 * do).sum() + (f2 * df).sum(), inputs)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-6


def test_public_op_dtype_and_errors():
    q, k, v, g, _ = _inputs(1, 20, 2, 8, 8, dtype=torch.float32)
    o, final = gated_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16())
    assert o.dtype == torch.bfloat16 and final is None
    with pytest.raises(ValueError, match="k and g must match"):
        gated_linear_attention(q, k, v, g[..., :4])
    with pytest.raises(ValueError, match="backend must be"):
        gated_linear_attention(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="log-decay"):
        gated_linear_attention(q, k, v, g.detach().abs() + 0.1)
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_linear_attention(q, k, v, g, initial_state=torch.zeros(1, 2, 8, 7))
    with pytest.raises(TypeError, match="g must be float16"):
        gated_linear_attention(q, k, v, g.long())
    with pytest.raises(ValueError, match="v must be"):
        gated_linear_attention(q, k, v[:, :5], g)


def test_same_semantics_as_flash_linear_attention():
    """Where flash-linear-attention is installed: its step-by-step GLA and gated delta rule agree with ours."""
    naive = pytest.importorskip("fla.ops.gla.naive")
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    from dash_kernels.ops.gated_delta import gated_delta_recurrent

    q, k, v, g, s0 = (t.detach().float() for t in _inputs(1, 24, 2, 8, 8))
    ours, _ = gla_recurrent(q, k, v, g, initial_state=s0)
    theirs, _ = naive.naive_recurrent_gla(q, k, v, g, initial_state=s0)
    assert rel_err(ours, theirs) < 1e-5
    k = F.normalize(k, dim=-1)
    g_head, beta = g[..., 0], torch.sigmoid(q[..., 0])
    ours, _ = gated_delta_recurrent(q, k, v, g_head, beta, initial_state=s0)
    theirs, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g_head, initial_state=s0)
    assert rel_err(ours, theirs) < 1e-5
