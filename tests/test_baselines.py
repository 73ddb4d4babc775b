"""Selector baselines on a tiny random model: sizes, determinism, scores, bounds, errors, export."""
import pytest
import torch

pytest.importorskip("transformers")

from dash import Candidate, build_supernet, export_hybrid, load_hybrid  # noqa: E402
from dash.baselines import METHODS, select, set_choices  # noqa: E402
from test_supernet import tiny_model  # noqa: E402

EFFICIENT = Candidate(window=4, sink=1)


def _net():
    return build_supernet(tiny_model("llama"), ["full", "swa4", "sink1_swa4"])


def _rows():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_every_selector_meets_the_budget(method):
    net = _net()
    out = select(net, method, 1, EFFICIENT, rows=_rows(), seed=2)
    layers = len(net.states)
    want = {"teacher": layers, "all_efficient": 0}.get(method, 1)
    assert len(out["full_layers"]) == want
    assert [c.name for c in out["choices"]].count("full") == want
    assert all(c == EFFICIENT for i, c in enumerate(out["choices"]) if i not in out["full_layers"])
    if method in ("ppl_drop", "attn_mse", "kl_restore"):
        assert len(out["scores"]) == layers and out["cost"]["forward_tokens"] > 0


def test_selectors_are_deterministic_and_scores_make_sense():
    net = _net()
    a = select(net, "random", 2, EFFICIENT, seed=5)["full_layers"]
    assert a == select(net, "random", 2, EFFICIENT, seed=5)["full_layers"]
    assert select(net, "uniform", 3, EFFICIENT)["full_layers"] == [0, 1, 2]
    assert select(net, "first", 2, EFFICIENT)["full_layers"] == [0, 1]
    assert select(net, "last", 2, EFFICIENT)["full_layers"] == [1, 2]
    rows = _rows()
    assert all(s >= -1e-6 for s in select(net, "attn_mse", 1, EFFICIENT, rows=rows)["scores"])
    # restoring full attention can only bring the model back toward the teacher on these rows (KL >= 0)
    kl = select(net, "kl_restore", 1, EFFICIENT, rows=rows)["scores"]
    assert max(kl) > 0


def test_one_hot_choices_compute_the_chosen_operator():
    model = tiny_model("qwen2")
    ids = _rows()[:1]
    with torch.no_grad():
        teacher = model(ids).logits
    net = build_supernet(model, ["full", "swa4"])
    set_choices(net, [0] * len(net.states))
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, teacher, atol=2e-5, rtol=1e-4)


def test_bad_input_is_named():
    net = _net()
    with pytest.raises(ValueError, match="unknown selector"):
        select(net, "duo", 1, EFFICIENT)
    with pytest.raises(ValueError, match="budget must be between 0 and 3"):
        select(net, "first", 4, EFFICIENT)
    with pytest.raises(ValueError, match="needs calibration rows"):
        select(net, "ppl_drop", 1, EFFICIENT)
    with pytest.raises(ValueError, match="not among"):
        select(net, "first", 1, Candidate(window=64))


def test_baseline_hybrid_goes_through_the_export_path(tmp_path):
    model = tiny_model("llama")
    net = build_supernet(model, ["full", "sink1_swa4"])
    out = select(net, "kl_restore", 1, EFFICIENT, rows=_rows())
    model.set_attn_implementation("sdpa")
    for layer in net.layers:
        del layer.dash
    export_hybrid(model, out["choices"], str(tmp_path))
    hybrid = load_hybrid(str(tmp_path))
    assert hybrid.generate(_rows()[:1, :8], max_new_tokens=2, do_sample=False).shape == (1, 10)
