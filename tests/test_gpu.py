"""GPU correctness: the Triton and CUDA kernels vs an fp32 reference at real lengths (run with `pytest -m gpu`).

bf16/fp16 error is judged FlashAttention's way: the kernel's error against the fp32 reference
must stay within a small multiple of what a plain low-precision PyTorch implementation scores
against the same reference.
"""
import zlib

import pytest
import torch

from dash_kernels import mixed_attention, mixed_attention_reference
from dash_kernels.backends import cuda_extension_available
from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu
# the CUDA C++ kernels (csrc/), where the extension is built (`pip install --no-build-isolation .`)
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not cuda_extension_available(),
                                                                     reason="dash_kernels._C not built"))]

CASES = {
    # name: (B, T, Hq, Hkv, D, dtype, windows, sinks, per_head)
    "qwen_T8192_bf16": (1, 8192, 16, 2, 128, torch.bfloat16, [None, 2047, 511], [0, 0, 1], False),
    "smol_T8192_fp16": (1, 8192, 9, 3, 64, torch.float16, [None, 1000, 333], [0, 64, 0], False),
    "dash_set_T4096_bf16_d64": (1, 4096, 16, 2, 64, torch.bfloat16, [None, 512, 2048, 512], [0, 0, 0, 64], True),
    "dash_set_T1000_fp16_d128": (2, 1000, 9, 3, 128, torch.float16, [None, 500, 130, 500], [0, 0, 0, 64], False),
    "no_full_T3001_bf16": (2, 3001, 9, 3, 64, torch.bfloat16, [777, 100], [1, 64], True),
    "windows_wider_than_T": (1, 257, 16, 2, 128, torch.bfloat16, [300, 1, None], [0, 1, 0], False),
    "t1": (3, 1, 16, 2, 128, torch.bfloat16, [1, None], [1, 0], False),
    "t17_d64": (2, 17, 9, 3, 64, torch.float16, [5, None], [1, 0], False),
    "eight_candidates_T2000": (1, 2000, 8, 2, 128, torch.bfloat16, [None, 1, 64, 65, 300, 300, 2048, 129],
                               [0, 0, 1, 0, 0, 64, 0, 200], True),
}


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


@torch.no_grad()
def _dw_condition_scale(q, k, v, w, windows, sinks, dy):
    """Norm over (head, candidate) of sum_{b,t} |<dY, O_c>| in fp32: the scale dw's rounding error lives on."""
    per_c = []
    for c in range(len(windows)):
        one_hot = torch.zeros_like(w)
        one_hot[..., c] = 1.0
        o_c = mixed_attention_reference(q, k, v, one_hot, windows, sinks).float()
        per_c.append((dy.float() * o_c).sum(-1).abs().sum(dim=(0, 1)))  # [Hq]
    scale = torch.stack(per_c, -1)  # [Hq, C]
    return (scale if w.dim() == 2 else scale.sum(0)).norm()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_vs_fp32_reference(name, backend):
    batch, seq, hq, hkv, d, dtype, windows, sinks, per_head = CASES[name]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=dtype,
                             device="cuda", seed=zlib.crc32(name.encode()) % 1000)
    inputs = (q, k, v, w)
    # dY from a seeded generator: the case is the same on every run
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).cuda()
    y = mixed_attention(q, k, v, w, windows, sinks, backend=backend)
    got = (y, *_grads(y, inputs, dy))
    del y
    y_ref = mixed_attention_reference(q, k, v, w, windows, sinks)  # fp32 compute
    want = tuple(t.float() for t in (y_ref, *_grads(y_ref, inputs, dy)))
    del y_ref
    y_low = mixed_attention_reference(q, k, v, w, windows, sinks, upcast=False)  # plain low precision
    low = (y_low, *_grads(y_low, inputs, dy))
    del y_low
    dw_scale = _dw_condition_scale(q, k, v, w, windows, sinks, dy)
    report, failures = [], []
    for label, g, r, l in zip(("y", "dq", "dk", "dv", "dw"), got, want, low):
        if label == "dw":
            # dw[c] = sum over 10^5..10^6 rows of <dY, O_c>; random-sign dY makes that sum cancel, so
            # its relative error measures the cancellation more than the kernel. Normalise by the
            # sum of |<dY, O_c>| (the sum's condition scale) instead, for the kernel and plain alike.
            err, err_plain = ((g - r).norm() / dw_scale).item(), ((l - r).norm() / dw_scale).item()
        else:
            err, err_plain = rel_err(g, r), rel_err(l, r)
        # FlashAttention-3's rule: 2x the plain error, plus twice the rounding quantum of the output
        # dtype at the reference's magnitude ((x + 0.3 - 0.3) - x); it matters where the plain error
        # is itself near zero (a 1-key window, T = 1)
        quantum = 0.0 if label == "dw" else rel_err((r.to(dtype) + 0.3 - 0.3).float(), r)  # dw is fp32
        report.append(f"{label}: kernel {err:.2e} plain {err_plain:.2e}")
        floor = 1e-6 if label == "dw" else 1e-4  # normalised dw errors sit near 1e-5
        if err > 2 * err_plain + 2 * quantum + floor:
            failures.append(f"{label}: kernel {err:.3e} vs plain {err_plain:.3e} (quantum {quantum:.1e})")
    print(name, backend, "; ".join(report), flush=True)
    assert not failures, f"{name} ({backend}): " + "; ".join(failures)


@pytest.mark.skipif(not cuda_extension_available(), reason="dash_kernels._C not built")
@pytest.mark.parametrize("name", ["dash_set_T1000_fp16_d128", "no_full_T3001_bf16", "eight_candidates_T2000", "t1"])
def test_cuda_kernels_keep_the_triton_contract(name):
    """The forward's O and LSE (sorted order, base 2) and the backward's dq, dk, dv, delta agree with Triton's on
    the same inputs, so either backward may consume either forward."""
    from dash_kernels.ops.mixed_attention import cuda_op, triton_op
    from dash_kernels.ops.mixed_attention.spec import make_plan

    batch, seq, hq, hkv, d, dtype, windows, sinks, per_head = CASES[name]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=dtype, device="cuda")
    plan = make_plan(windows, sinks)
    scale = d ** -0.5
    with torch.no_grad():
        y_c, o_c, lse_c = cuda_op.mixed_attention_fwd(q, k, v, w, plan, scale)
        y_t, o_t, lse_t = triton_op.mixed_attention_fwd(q, k, v, w, plan, scale)
    torch.cuda.synchronize()
    errors = {"y": rel_err(y_c, y_t), "o": rel_err(o_c, o_t), "lse": (lse_c - lse_t).abs().max().item()}
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=dtype).cuda()
    with torch.no_grad():
        grads_c = cuda_op.mixed_attention_bwd(dy, q, k, v, w, o_t, lse_t, plan, scale)
        grads_t = triton_op.mixed_attention_bwd(dy, q, k, v, w, o_t, lse_t, plan, scale)
    for label, a, b in zip(("dq", "dk", "dv", "delta"), grads_c, grads_t):
        errors[label] = rel_err(a, b)
    print(name, {key: f"{value:.2e}" for key, value in errors.items()}, flush=True)
    assert all(value < 1e-2 for value in errors.values()), errors


@pytest.mark.skipif(not cuda_extension_available(), reason="dash_kernels._C not built")
@pytest.mark.parametrize("variant", ["sm90", "sm90lean", "sm90dq"])
@pytest.mark.parametrize("name", ["dash_set_T1000_fp16_d128", "no_full_T3001_bf16", "eight_candidates_T2000",
                                  "t17_d64", "qwen_T8192_bf16"])
def test_cuda_sm90_backward_matches_mma(name, variant, monkeypatch):
    """DASH_CUDA_BWD=sm90 / sm90lean / sm90dq (the Hopper wgmma backward) against DASH_CUDA_BWD=mma on the same
    forward outputs: the same math in another order of fp32 sums, so they agree far below bf16's plain error; and it
    must have run (no fallback warning). Skipped off sm_90 and where the build has no CuTe headers."""
    import warnings

    from dash_kernels.ops.mixed_attention import cuda_op
    from dash_kernels.ops.mixed_attention.spec import make_plan

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 backward needs an sm_90 GPU")
    batch, seq, hq, hkv, d, dtype, windows, sinks, per_head = CASES[name]
    q, k, v, w = make_inputs(batch, seq, hq, hkv, d, len(windows), per_head=per_head, dtype=dtype, device="cuda")
    plan = make_plan(windows, sinks)
    scale = d ** -0.5
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=dtype).cuda()
    with torch.no_grad():
        _, o, lse = cuda_op.mixed_attention_fwd(q, k, v, w, plan, scale)
        monkeypatch.setenv("DASH_CUDA_BWD", "mma")
        want = cuda_op.mixed_attention_bwd(dy, q, k, v, w, o, lse, plan, scale)
        monkeypatch.setenv("DASH_CUDA_BWD", variant)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = cuda_op.mixed_attention_bwd(dy, q, k, v, w, o, lse, plan, scale)
            except RuntimeError as error:
                if "no Hopper backward" in str(error):
                    pytest.skip(str(error))
                raise
    torch.cuda.synchronize()
    assert not [c for c in caught if "sm90 backward" in str(c.message)], "the sm90 backward fell back"
    errors = {label: rel_err(a, b) for label, a, b in zip(("dq", "dk", "dv", "delta"), got, want)}
    print(name, variant, "vs mma", {key: f"{value:.2e}" for key, value in errors.items()}, flush=True)
    assert all(value < 1e-2 for value in errors.values()), errors


def test_cuda_backend_refuses_what_it_does_not_take():
    q, k, v, w = make_inputs(1, 64, 2, 1, 32, 2, dtype=torch.bfloat16, device="cuda")  # D 32
    with pytest.raises(ValueError, match="backend='cuda' is unavailable for these inputs"):
        mixed_attention(q, k, v, w, [None, 8], backend="cuda")


def test_fp32_inputs_are_accurate():
    q, k, v, w = make_inputs(1, 513, 4, 2, 128, 3, per_head=True, dtype=torch.float32, device="cuda")
    windows, sinks = [None, 100, 7], [0, 3, 0]
    y = mixed_attention(q, k, v, w, windows, sinks, backend="triton")
    dy = torch.randn_like(y)
    got = (y, *_grads(y, (q, k, v, w), dy))
    y_ref = mixed_attention_reference(*(t.double() for t in (q, k, v, w)), windows, sinks)
    want = (y_ref, *_grads(y_ref, (q, k, v, w), dy.double()))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-5


def test_auto_picks_triton_on_cuda_and_matches():
    q, k, v, w = make_inputs(1, 300, 4, 2, 64, 2, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        a = mixed_attention(q, k, v, w, [None, 50])
        b = mixed_attention(q, k, v, w, [None, 50], backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ["chunk", "recurrent"])
@pytest.mark.parametrize("seq,heads,kd,vd", [(16384, 4, 128, 129), (4096, 9, 64, 64)])
def test_gla_triton_long_sequences(seq, heads, kd, vd, algorithm, monkeypatch):
    """Gated linear attention (Triton) in bf16 against the fp32 chunked reference on the GPU itself."""
    import torch.nn.functional as F

    from dash_kernels import gated_linear_attention
    from dash_kernels.ops.gla import gla_chunked
    from dash_kernels.ops.gla import interface as gla_interface

    monkeypatch.setattr(gla_interface, "TRITON_ALGORITHM", algorithm)
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q, k = (torch.randn(1, seq, heads, kd, device="cuda", generator=gen) * 0.3 for _ in range(2))
    v = torch.randn(1, seq, heads, vd, device="cuda", generator=gen)
    g = F.logsigmoid(torch.randn(1, seq, heads, kd, device="cuda", generator=gen) + 3.0)
    s0 = torch.randn(1, heads, kd, vd, device="cuda", generator=gen)
    low = [t.bfloat16().requires_grad_(True) for t in (q, k, v, g)] + [s0.clone().requires_grad_(True)]
    full = [t.detach().float().requires_grad_(True) for t in low]
    o, final = gated_linear_attention(*low[:4], initial_state=low[4], output_final_state=True, backend="triton")
    o_ref, final_ref = gla_chunked(*full[:4], initial_state=full[4], output_final_state=True)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad((o.float() * do).sum() + final.sum(), low)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + final_ref.sum(), full)
    report = [f"o {rel_err(o, o_ref):.2e}", f"final {rel_err(final, final_ref):.2e}"]
    report += [f"{n} {rel_err(a, b):.2e}" for n, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_ref)]
    print(f"gla {algorithm} T{seq} H{heads} K{kd} V{vd}:", "; ".join(report), flush=True)
    # bf16 inputs and outputs, fp32 state: errors at the level of bf16 rounding
    assert rel_err(o, o_ref) < 1e-2 and rel_err(final, final_ref) < 1e-2
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("kd,vd", [(128, 129), (64, 64)])
def test_gla_chunk_both_intra_paths_on_gpu(kd, vd):
    """Chunks with strong decays take the exact element-wise intra-chunk kernels, the others the one-product
    ones: both compiled for the GPU, in one ragged sequence (T 3000), bf16 against the fp32 reference."""
    import torch.nn.functional as F

    from dash_kernels import gated_linear_attention
    from dash_kernels.ops.gla import gla_chunked, triton_chunk

    seq, heads = 3000, 3
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k = (torch.randn(2, seq, heads, kd, device="cuda", generator=gen) * 0.3 for _ in range(2))
    v = torch.randn(2, seq, heads, vd, device="cuda", generator=gen)
    g = F.logsigmoid(torch.randn(2, seq, heads, kd, device="cuda", generator=gen) + 3.0)
    strong = (torch.arange(seq, device="cuda") // 64) % 3 == 1  # every third chunk: spans far over 60
    g[:, strong] = -8.0 * torch.rand(g[:, strong].shape, device="cuda", generator=gen)
    paths = triton_chunk.gla_cumsum(g.bfloat16(), 64)[1]
    assert paths.eq(0).any() and paths.eq(1).any()
    low = [t.bfloat16().requires_grad_(True) for t in (q, k, v, g)]
    full = [t.detach().float().requires_grad_(True) for t in low]
    o, _ = gated_linear_attention(*low, backend="triton")
    o_ref, _ = gla_chunked(*full)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad((o.float() * do).sum(), low)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), full)
    report = [f"o {rel_err(o, o_ref):.2e}"] + [f"{n} {rel_err(a, b):.2e}"
                                              for n, a, b in zip(("dq", "dk", "dv", "dg"), grads, grads_ref)]
    print(f"gla both paths T{seq} K{kd} V{vd}:", "; ".join(report), flush=True)
    assert rel_err(o, o_ref) < 1e-2
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("inverse_blocks", [4, 8])
@pytest.mark.parametrize("seq,heads,kd,vd", [(16384, 4, 128, 128), (4096, 9, 64, 64)])
def test_gated_delta_triton_long_sequences(seq, heads, kd, vd, inverse_blocks, monkeypatch):
    """Gated delta rule (Triton, chunked WY) in bf16 against the fp32 chunked reference on the GPU itself, with
    either block count of the chunk inverse (gated_delta.triton_chunk.INVERSE_BLOCKS)."""
    import torch.nn.functional as F

    from dash_kernels import gated_delta_rule
    from dash_kernels.ops.gated_delta import gated_delta_chunked, triton_chunk

    monkeypatch.setattr(triton_chunk, "INVERSE_BLOCKS", inverse_blocks)

    gen = torch.Generator(device="cuda").manual_seed(seq + 1)
    q = torch.randn(1, seq, heads, kd, device="cuda", generator=gen)
    k = F.normalize(torch.randn(1, seq, heads, kd, device="cuda", generator=gen), dim=-1)
    v = torch.randn(1, seq, heads, vd, device="cuda", generator=gen)
    g = F.logsigmoid(torch.randn(1, seq, heads, device="cuda", generator=gen) + 3.0)
    beta = torch.sigmoid(torch.randn(1, seq, heads, device="cuda", generator=gen))
    s0 = torch.randn(1, heads, kd, vd, device="cuda", generator=gen)
    low = [t.bfloat16().requires_grad_(True) for t in (q, k, v, g, beta)] + [s0.clone().requires_grad_(True)]
    full = [t.detach().float().requires_grad_(True) for t in low]
    o, final = gated_delta_rule(*low[:5], initial_state=low[5], output_final_state=True, backend="triton")
    o_ref, final_ref = gated_delta_chunked(*full[:5], initial_state=full[5], output_final_state=True)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad((o.float() * do).sum() + final.sum(), low)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + final_ref.sum(), full)
    report = [f"o {rel_err(o, o_ref):.2e}", f"final {rel_err(final, final_ref):.2e}"]
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    report += [f"{n} {rel_err(a, b):.2e}" for n, a, b in zip(names, grads, grads_ref)]
    print(f"gdn T{seq} H{heads} K{kd} V{vd} inverse blocks {inverse_blocks}:", "; ".join(report), flush=True)
    assert rel_err(o, o_ref) < 1e-2 and rel_err(final, final_ref) < 1e-2
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2e-2
