"""Triton kernels vs the PyTorch reference: forward and every gradient.

On a machine without a GPU these run in Triton's interpreter (see conftest.py) with
16-wide tiles, so short sequences still cross many tile and window edges.
"""
import pytest
import torch

from dash_kernels import mixed_attention, mixed_attention_reference
from dash_kernels.ops.mixed_attention import triton_op
from dash_kernels.ops.mixed_attention.triton_op import TileConfig
from helpers import make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    # name: (B, T, Hq, Hkv, D, windows, sinks, per_head)
    "t1": (1, 1, 2, 1, 16, [1, None], [1, 0], False),
    "full_only": (1, 37, 2, 1, 16, [None], None, False),
    "win1_wider_than_T_sink1": (2, 45, 3, 3, 32, [1, 100], [1, 0], False),
    "gqa_6_2_per_head": (1, 53, 6, 2, 32, [None, 7, 20, 3], [0, 0, 1, 4], True),
    "no_full_candidate": (1, 70, 4, 2, 64, [16, 33], [1, 0], False),
    "equal_windows": (1, 40, 2, 1, 16, [17, 17, None], [0, 5, 0], False),
    "head_dim_24": (1, 33, 2, 2, 24, [4, None], [2, 0], False),
    "dash_set_scaled": (2, 61, 4, 2, 16, [None, 12, 30, 12], [0, 0, 0, 3], True),
    "sinks_wider_than_windows": (1, 50, 3, 1, 16, [3, 9], [20, 40], False),
    # bands wider than two tiles: unmasked tile runs inside every band, not only the full one
    "long_bands": (1, 150, 2, 1, 16, [40, 90, None], [0, 2, 0], True),
    # bands wider than a 16x16 tile's distance span: the backward's two-region edge tiles (EDGE),
    # beside per-element regions on the key tiles holding sinks
    "edge_tiles_sinks_gqa": (1, 200, 4, 2, 16, [None, 48, 100, 48], [0, 0, 0, 5], True),
    "edge_tiles_no_full": (1, 190, 2, 1, 16, [40, 90], [0, 33], False),
}


def _check(case, dtype=torch.float32, seed=0, non_contiguous=False, tol=2e-5):
    batch, seq, hq, hkv, d, windows, sinks, per_head = case
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=dtype,
                             device=DEVICE, seed=seed, non_contiguous=non_contiguous)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="triton")
    assert y.dtype == q.dtype and y.shape == q.shape
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, (q, k, v, w), dy)
    y_ref = mixed_attention_reference(q, k, v, w, windows, sinks)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v, w), dy)
    for name, got, want in zip(("y", "dq", "dk", "dv", "dw"), (y, *grads), (y_ref, *grads_ref)):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    _check(CASES[name])


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
@pytest.mark.parametrize("name", ["gqa_6_2_per_head", "dash_set_scaled", "sinks_wider_than_windows", "long_bands",
                                  "edge_tiles_sinks_gqa"])
def test_uneven_tiles(name, tiles, monkeypatch):
    block_m, block_n = tiles
    cfg = TileConfig(block_m, block_n, 4, 1)
    monkeypatch.setattr(triton_op, "CONFIG_OVERRIDES", {"fwd": cfg, "dkdv": cfg, "dq": cfg})
    _check(CASES[name])


@pytest.mark.parametrize("name", ["long_bands", "edge_tiles_sinks_gqa", "edge_tiles_no_full", "dash_set_scaled"])
def test_unspecialized_edges(name, monkeypatch):
    """The other code paths: one forward loop testing each block; every masked backward tile per element."""
    cfg = TileConfig(16, 16, 1, 1, specialize_edges=False)
    monkeypatch.setattr(triton_op, "CONFIG_OVERRIDES", {"fwd": cfg, "dkdv": cfg, "dq": cfg})
    _check(CASES[name])


def test_edge_mode_needs_bands_wider_than_a_tile():
    from dash_kernels.ops.mixed_attention.spec import make_plan

    cfg = TileConfig(16, 16, 1, 1)
    assert triton_op._edge_mode(make_plan([None, 48, 100]), cfg) == 1
    assert triton_op._edge_mode(make_plan([None, 30, 100]), cfg) == 2  # band 0 narrower than 31
    assert triton_op._edge_mode(make_plan([None, 48, 70]), cfg) == 2  # band 1 narrower than 31
    assert triton_op._edge_mode(make_plan([None, 48, 100]), TileConfig(16, 16, 1, 1, False)) == 2


def test_non_contiguous_inputs():
    _check(CASES["gqa_6_2_per_head"], non_contiguous=True)


def test_large_scores_stay_finite():
    """Candidates whose LSEs are far apart (one key dominates the full candidate only)."""
    batch, seq, hq, hkv, d = 1, 40, 2, 1, 16
    windows, sinks = [None, 4, 6], [0, 0, 2]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, 3, device=DEVICE)
    with torch.no_grad():
        k[:, 5] *= 60.0  # huge scores against key 5: far outside the narrow windows of late queries
        q.mul_(3.0)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, (q, k, v, w), dy)
    y_ref = mixed_attention_reference(q.double(), k.double(), v.double(), w.double(), windows, sinks)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v, w), dy.double())
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_relative_to_plain_implementation(dtype):
    """FlashAttention's rule: kernel error vs an fp32 reference <= a small multiple of plain low-precision error."""
    batch, seq, hq, hkv, d, windows, sinks, per_head = CASES["dash_set_scaled"]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=dtype, device=DEVICE)
    y = mixed_attention(q, k, v, w, windows, sinks, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, (q, k, v, w), dy)
    y_ref = mixed_attention_reference(q, k, v, w, windows, sinks)  # fp32 compute
    grads_ref = torch.autograd.grad(y_ref, (q, k, v, w), dy)
    y_low = mixed_attention_reference(q, k, v, w, windows, sinks, upcast=False)
    grads_low = torch.autograd.grad(y_low, (q, k, v, w), dy)
    for name, got, want, low in zip(("y", "dq", "dk", "dv", "dw"), (y, *grads), (y_ref, *grads_ref),
                                    (y_low, *grads_low)):
        assert rel_err(got, want) <= 2 * rel_err(low, want) + 1e-3, name


def test_opcheck():
    import dash_kernels.ops.mixed_attention.op  # noqa: F401  registers the op (run alone, nothing else has)
    q, k, v, w = make_inputs(1, 20, 2, 1, 16, 3, per_head=True, device=DEVICE)
    torch.library.opcheck(
        torch.ops.dash_kernels.mixed_attention_fwd.default,
        (q, k, v, w, [0, 5, 3], [0, 0, 2], 0.25),
    )


def test_torch_compile_traces_the_op():
    q, k, v, w = make_inputs(1, 20, 2, 1, 16, 2, device=DEVICE)

    def layer(q, k, v, w):
        return mixed_attention(q, k, v, torch.softmax(w, -1), [None, 4], [0, 1], backend="triton") * 2

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(q, k, v, w)
    y.sum().backward()
    y_ref = layer(q, k, v, w)
    assert rel_err(y, y_ref) < 1e-6
    assert w.grad is not None and torch.isfinite(w.grad).all()
