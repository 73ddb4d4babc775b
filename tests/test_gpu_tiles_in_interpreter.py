"""The kernels at the tile sizes a GPU launch uses, run in Triton's interpreter.

The other interpreter tests use small tiles (16-token chunks, 16 x 16 attention tiles) so that short sequences
cross many tiles; a GPU launches 64-token chunks, 32-column key slices, [64, 128] attention tiles. Same code,
different constexprs: these runs check the GPU configurations' index arithmetic against the references on the
CPU, before any GPU time is spent (the GPU tests then check the compiled code).
"""
import pytest
import torch
import torch.nn.functional as F

import dash_kernels
from dash_kernels.ops.gated_delta import gated_delta_recurrent
from dash_kernels.ops.gated_delta import triton_chunk as gdn_chunk
from dash_kernels.ops.gla import gla_recurrent
from dash_kernels.ops.gla import interface as gla_interface
from dash_kernels.ops.gla import triton_chunk as gla_chunk
from dash_kernels.ops.mixed_attention import triton_op
from dash_kernels.ops.mixed_attention.reference import mixed_attention_reference
from helpers import rel_err

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only (a GPU runs these tiles anyway)")


def _grads(out, final, inputs, gen):
    do = torch.randn(out.shape, generator=gen).to(out.dtype)  # the same numbers for fp32 and fp64 outputs
    loss = (out * do).sum() + (final.sum() if final is not None else 0)
    return torch.autograd.grad(loss, inputs)


@pytest.fixture
def gpu_chunks(monkeypatch):
    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", "chunk")
    monkeypatch.setattr(gla_chunk, "chunk_size", lambda interpreting: 64)
    monkeypatch.setattr(gdn_chunk, "chunk_size", lambda interpreting: 64)


@pytest.mark.parametrize("gla_path", ["one_product", "elementwise"])
def test_linear_kernels_at_gpu_chunk_sizes(gpu_chunks, gla_path, monkeypatch):
    """T 130 (two full chunks and a ragged one), K 128 (4 key slices, 2 walk tiles), V 96 (3 value tiles);
    GLA's intra-chunk terms both ways (mild decays take one product; the forced span sends them element-wise)."""
    if gla_path == "elementwise":
        monkeypatch.setattr(gla_chunk, "ONE_PRODUCT_SPAN", -1.0)
    gen = torch.Generator().manual_seed(0)
    b, t, h, kd, vd = 1, 130, 1, 128, 96
    q = torch.randn(b, t, h, kd, generator=gen) * 0.3
    k = torch.randn(b, t, h, kd, generator=gen) * 0.3
    v = torch.randn(b, t, h, vd, generator=gen)
    s0 = torch.randn(b, h, kd, vd, generator=gen)
    g_gla = F.logsigmoid(torch.randn(b, t, h, kd, generator=gen) + 2)
    g_gdn = F.logsigmoid(torch.randn(b, t, h, generator=gen) + 2)
    beta = torch.sigmoid(torch.randn(b, t, h, generator=gen))
    k_unit = F.normalize(k, dim=-1)
    for op, ref, args in [
        (dash_kernels.gated_linear_attention, gla_recurrent, (q, k, v, g_gla)),
        (dash_kernels.gated_delta_rule, gated_delta_recurrent, (q, k_unit, v, g_gdn, beta)),
    ]:
        inputs = [x.clone().requires_grad_(True) for x in (*args, s0)]
        out, final = op(*inputs[:-1], initial_state=inputs[-1], output_final_state=True, backend="triton")
        doubles = [x.detach().double().requires_grad_(True) for x in inputs]
        out_ref, final_ref = ref(*doubles[:-1], initial_state=doubles[-1], output_final_state=True)
        assert rel_err(out, out_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
        grads = _grads(out, final, inputs, torch.Generator().manual_seed(1))
        grads_ref = _grads(out_ref, final_ref, doubles, torch.Generator().manual_seed(1))
        for i, (a, r) in enumerate(zip(grads, grads_ref)):
            assert rel_err(a, r) < 1e-4, (op.__name__, i, rel_err(a, r))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_attention_at_gpu_tiles(head_dim, monkeypatch):
    """The tuned bf16 tile configs (e.g. [64, 64] forward, [32, 128] dK/dV at D 128) on fp32 inputs, T 200, GQA,
    the 4-candidate set with a sink."""
    monkeypatch.setattr(triton_op, "CONFIG_OVERRIDES", dict(triton_op._gpu_configs(head_dim)))
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 200, 4, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(1, 200, 2, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(1, 200, 2, head_dim, generator=gen, requires_grad=True)
    w = torch.softmax(torch.randn(4, generator=gen), 0).requires_grad_(True)
    windows, sinks = [None, 40, 130, 40], [0, 0, 0, 8]
    y = dash_kernels.mixed_attention(q, k, v, w, windows, sinks, backend="triton")
    y_ref = mixed_attention_reference(*(x.detach().double().requires_grad_(True) for x in (q, k, v, w)),
                                      windows, sinks)
    assert rel_err(y, y_ref) < 1e-5
    grads = _grads(y, None, [q, k, v, w], torch.Generator().manual_seed(2))
    inputs_ref = [x.detach().double().requires_grad_(True) for x in (q, k, v, w)]
    y_ref = mixed_attention_reference(*inputs_ref, windows, sinks)
    grads_ref = _grads(y_ref, None, inputs_ref, torch.Generator().manual_seed(2))
    for name, a, r in zip("qkvw", grads, grads_ref):
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))
