"""Triton gated linear attention vs the step-by-step definition: output, final state, every gradient.

Without a GPU these run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import pytest
import torch
import torch.nn.functional as F

from dash_kernels import gated_linear_attention
from dash_kernels.ops.gla import gla_recurrent
from dash_kernels.ops.gla import interface as gla_interface
from helpers import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = {
    # name: (B, T, H, K, V)
    "t1": (2, 1, 2, 16, 16),
    "k_ne_v_odd_t": (2, 37, 3, 16, 24),
    "v_wider_than_a_tile": (1, 21, 2, 32, 80),  # several value tiles: dq/dk summed across programs
    "dash_linear_candidate": (1, 19, 2, 64, 65),  # values carry the normaliser column
    "keys_wider_than_a_walk_tile": (1, 21, 2, 128, 24),  # the state walks split K into tiles of 64
}


def _inputs(b, t, h, kd, vd, dtype=torch.float32, seed=0, strong_decay=False, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    if non_contiguous:  # [B, H, T, D] storage seen as [B, T, H, D]
        q, k, v = (rnd(b, h, t, d).transpose(1, 2) for d in (kd, kd, vd))
    else:
        q, k, v = rnd(b, t, h, kd), rnd(b, t, h, kd), rnd(b, t, h, vd)
    g = F.logsigmoid(rnd(b, t, h, kd) * (6.0 if strong_decay else 1.0) + 2.0)
    s0 = rnd(b, h, kd, vd)
    return [x.to(device=DEVICE, dtype=dtype).requires_grad_(True) for x in (q, k, v, g)] + \
        [s0.to(DEVICE).requires_grad_(True)]


def _check(q, k, v, g, s0, with_state, tol):
    init = s0 if with_state else None
    o, final = gated_linear_attention(q, k, v, g, initial_state=init, output_final_state=True, backend="triton")
    o_ref, final_ref = gla_recurrent(*(t.double() for t in (q, k, v, g)),
                                     initial_state=None if init is None else init.double(), output_final_state=True)
    assert o.dtype == q.dtype and final.dtype == torch.float32
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    dfinal = torch.randn(final.shape, generator=torch.Generator().manual_seed(2)).to(final)
    inputs = [q, k, v, g] + ([s0] if with_state else [])
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (final * dfinal).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * dfinal.double()).sum(), inputs)
    assert rel_err(o, o_ref) < tol and rel_err(final, final_ref) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_ref):
        # dg is a difference of O(1) terms (q*dq - k*dk) that cancel where g has no effect (exactly 0 at T = 1
        # without a state): judge it against fp32 cancellation of those terms, a decade looser
        limit = tol * (10 if name == "dg" else 1)
        assert rel_err(a, b) < limit, (name, rel_err(a, b))


@pytest.fixture(params=["chunk", "recurrent"])
def algorithm(request, monkeypatch):
    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", request.param)
    return request.param


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_matches_recurrent_definition(name, with_state, algorithm):
    _check(*_inputs(*SHAPES[name], strong_decay=name == "k_ne_v_odd_t"), with_state, tol=1e-5)


def test_chunked_kernels_survive_extreme_decay(monkeypatch):
    """log-decays down to -30 a step: every exponent the chunked kernels form stays <= 0."""
    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", "chunk")
    q, k, v, g, s0 = _inputs(1, 35, 2, 16, 16)
    g = (g.detach() * 20 - 10 * torch.rand(g.shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    _check(q, k, v, g, s0, True, tol=1e-5)


def test_one_product_and_elementwise_paths_agree(monkeypatch):
    """Chunks with mild decay form their intra-chunk terms as one product through the middle row, chunks with
    strong decay element by element; one sequence with both, and the element-wise path forced everywhere."""
    from dash_kernels.ops.gla import triton_chunk

    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", "chunk")
    q, k, v, g, s0 = _inputs(2, 45, 2, 16, 24)
    strong = torch.zeros_like(g)
    strong[:, :16] = -12.0 * torch.rand(strong[:, :16].shape, generator=torch.Generator().manual_seed(3))
    g = (g.detach() + strong).requires_grad_(True)  # first chunk: spans far over ONE_PRODUCT_SPAN
    paths = triton_chunk.gla_chunk_fwd(*(t.detach().contiguous() for t in (q, k, v, g)), 0.25, None, False,
                                       triton_chunk.chunk_size(True))[-1]
    assert paths[:, 0].eq(0).all() and paths[:, 1:].eq(1).all(), paths
    _check(q, k, v, g, s0, True, tol=1e-5)
    monkeypatch.setattr(triton_chunk, "ONE_PRODUCT_SPAN", -1.0)  # every chunk element-wise
    _check(q, k, v, g, s0, True, tol=1e-5)


def test_non_contiguous_inputs(algorithm):
    _check(*_inputs(2, 23, 2, 16, 32, non_contiguous=True), True, tol=1e-5)


def test_bf16_inputs_fp32_state(algorithm):
    # bf16 inputs: error of the order of bf16 rounding of the inputs and outputs, state kept in fp32
    _check(*_inputs(1, 40, 2, 32, 32, dtype=torch.bfloat16), True, tol=2e-2)


def test_without_final_state_and_auto_backend():
    q, k, v, g, _ = _inputs(1, 9, 2, 16, 16)
    o, final = gated_linear_attention(q, k, v, g, backend="triton")
    assert final is None
    o_auto, _ = gated_linear_attention(q, k, v, g)  # CPU: the chunked reference; CUDA: the same kernel
    assert rel_err(o, o_auto) < 1e-5
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g))


def test_bf16_decay_gradient_does_not_drift_with_length(monkeypatch):
    """dg_t sums q*dq - k*dk over the rest of the sequence. Summed over the whole sequence, that cancels, and
    its error grew with T (2.6e-2 at T 16384 on the H200 with 16-bit states). The kernels sum inside a chunk
    and take the rest from the states (sum_v h * dh), so the error must not grow with T."""
    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", "chunk")

    def dg_error(seq):
        gen = torch.Generator().manual_seed(1024)
        q, k = (torch.randn(1, seq, 1, 32, generator=gen) * 0.3 for _ in range(2))
        v = torch.randn(1, seq, 1, 32, generator=gen)
        g = F.logsigmoid(torch.randn(1, seq, 1, 32, generator=gen) + 3.0)
        low = [t.to(DEVICE, torch.bfloat16).requires_grad_(True) for t in (q, k, v, g)]
        full = [t.detach().double().requires_grad_(True) for t in low]
        o, _ = gated_linear_attention(*low, backend="triton")
        o_ref, _ = gla_recurrent(*full)
        do = torch.randn(o.shape, generator=gen).to(DEVICE)
        dg = torch.autograd.grad((o.float() * do).sum(), low[3])[0]
        dg_ref = torch.autograd.grad((o_ref * do.double()).sum(), full[3])[0]
        return rel_err(dg, dg_ref)

    short, long = dg_error(128), dg_error(1024)
    # bf16 operands (what the tensor cores take) give ~6e-3 at any length here
    assert long < 1e-2 and long < 1.3 * short, (short, long)


def test_value_columns_past_whole_tiles(monkeypatch):
    """V = K + 1, as the search's candidate (a column of ones for its normaliser): whole value tiles and a
    narrower tail tile, in every kernel that tiles the values."""
    from dash_kernels.ops.gla import triton_chunk

    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", "chunk")
    assert triton_chunk.value_tiles(129, 64) == [(0, 64, 2), (128, 16, 1)]
    assert triton_chunk.value_tiles(24, 32) == [(0, 32, 1)] and triton_chunk.value_tiles(128, 64) == [(0, 64, 2)]
    _check(*_inputs(1, 37, 2, 16, 65), True, tol=1e-5)
