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
    if method in ("ppl_drop", "attn_mse", "kl_restore", "duo_gate"):
        assert len(out["scores"]) == layers and out["cost"]["forward_tokens"] > 0
    if method == "duo_gate":  # gates are probabilities, and the logits are left as they were
        assert all(0.0 < g < 1.0 for g in out["scores"])
        assert all(float(s.alpha.abs().max()) == 0.0 for s in net.states)


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


def test_compare_writes_a_table_and_resumes(tmp_path, monkeypatch):
    import json

    import dash.ruler as ruler
    from dash.compare import compare
    from test_search import random_data

    class CharTokenizer:  # ids fit the tiny model's 97-token vocabulary
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            ids = [ord(c) % 97 for c in text]
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(int(i) + 32) for i in ids)

    words = [f"{a}{b}" for a in "abcdefgh" for b in "ijklmnop"]
    original = ruler.generate_samples
    monkeypatch.setattr(ruler, "generate_samples",
                        lambda tok, task, length, n, seed=0: original(tok, task, length, n, seed, words=words))
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    net = build_supernet(model, ["full", "swa4", "sink1_swa4"])
    rows = _rows()
    kwargs = dict(methods=["first", "random", "kl_restore", "teacher"], random_seeds=(0, 1), search_tokens=96,
                  search_batch=2, lengths=[700], tasks=["passkey"], samples=1, output_dir=str(tmp_path),
                  progress=False)
    out = compare(net, CharTokenizer(), random_data(), rows, rows, [1, 2], EFFICIENT, **kwargs)
    measured = {(r["method"], r["budget"], r["seed"]) for r in out["rows"]}
    assert ("dash", 1, None) in measured and ("random", 2, 1) in measured and ("teacher", 1, None) in measured
    assert ("teacher", 2, None) not in measured  # the bounds do not depend on the budget
    table = (tmp_path / "compare.md").read_text()
    assert "| dash |" in table and "± " in table and (tmp_path / "compare.png").exists()
    # a second run finds every row measured and recomputes none of them
    saved = json.load(open(tmp_path / "compare.json"))
    monkeypatch.setattr("dash.compare.select", lambda *a, **k: pytest.fail("should have resumed"))
    again = compare(net, CharTokenizer(), random_data(), rows, rows, [1, 2], EFFICIENT, **kwargs)
    assert len(again["rows"]) == len(saved["rows"])
