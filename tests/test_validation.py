"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

from dash_kernels import mixed_attention


def _inputs(b=1, t=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (torch.randn(b, t, hq, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype),
            torch.randn(b, t, hkv, d, dtype=dtype))


def _call(q=None, k=None, v=None, weights=None, windows=(None, 4), sinks=None, **kw):
    q0, k0, v0 = _inputs()
    q, k, v = (q0 if q is None else q), (k0 if k is None else k), (v0 if v is None else v)
    weights = torch.ones(len(windows)) if weights is None else weights
    return mixed_attention(q, k, v, weights, windows, sinks, **kw)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(q=torch.randn(8, 4, 16)), ValueError, r"q must be 4-D"),
        (dict(k=torch.randn(1, 8, 2, 32)), ValueError, r"k and v must have the same shape"),
        (dict(k=torch.randn(1, 8, 2, 32), v=torch.randn(1, 8, 2, 32)), ValueError, r"k/v must be \[B, T, Hkv, D\]"),
        (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), ValueError, r"multiple of key/value heads"),
        (dict(q=torch.randn(1, 8, 4, 16, dtype=torch.float64)), TypeError, r"q must be float16, bfloat16 or float32"),
        (dict(q=torch.randint(0, 3, (1, 8, 4, 16))), TypeError, r"q must be float16"),
        (dict(k=torch.randn(1, 8, 2, 16).half(), v=torch.randn(1, 8, 2, 16).half()), TypeError, r"share one dtype"),
        (dict(q=[1, 2]), TypeError, r"q must be a torch.Tensor"),
        (dict(windows=()), ValueError, r"windows must name at least one candidate"),
        (dict(windows=None, weights=torch.ones(2)), TypeError, r"windows must be a sequence"),
        (dict(windows=(0, None)), ValueError, r"windows\[0\] must be >= 1"),
        (dict(windows=(2.5, None)), TypeError, r"windows\[0\] must be an int"),
        (dict(sinks=(1,)), ValueError, r"sinks must have one entry per window"),
        (dict(sinks=(-1, 0)), ValueError, r"sinks\[0\] must be >= 0"),
        (dict(weights=torch.ones(3)), ValueError, r"weights must be \[C\] = \[2\] or \[Hq, C\] = \[4, 2\]"),
        (dict(weights=torch.ones(3, 2)), ValueError, r"weights must be \[C\]"),
        (dict(weights=torch.ones(2, dtype=torch.int64)), TypeError, r"weights must be a floating-point tensor"),
        (dict(backend="fast"), ValueError, r"backend must be one of"),
        (dict(backend="cuda"), ValueError, r"backend='cuda' is unavailable"),
        (dict(scale=float("nan")), TypeError, r"scale must be a finite float"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' is unavailable.*CUDA tensors"):
        _call(backend="triton")


def test_head_dim_beyond_triton_support(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _inputs(d=512)
    with pytest.raises(ValueError, match=r"head dim D <= 256, got D = 512"):
        mixed_attention(q, k, v, torch.ones(1), [None], backend="triton")


def test_mixed_devices():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"one device"):
        mixed_attention(q.to("meta"), k, v, torch.ones(1), [None])


def test_auto_on_cpu_runs_without_triton():
    q, k, v = _inputs()
    y = mixed_attention(q, k, v, torch.tensor([0.3, 0.7]), [None, 2], [0, 1])
    assert y.shape == q.shape and torch.isfinite(y).all()
