"""Discretisation under budgets and export to a loadable model directory (tiny random models)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dash import Candidate, build_supernet, discretise, export_hybrid, load_hybrid  # noqa: E402
from test_supernet import tiny_model  # noqa: E402

CANDS = [Candidate(), Candidate(window=8), Candidate(window=8, sink=2)]


def test_discretise_full_layer_budget():
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    names = [c.name for c in discretise(probs, CANDS, budget=2)]
    assert names == ["swa8", "full", "full", "sink2_swa8"]
    assert [c.name for c in discretise(probs, CANDS, budget=0)].count("full") == 0
    with pytest.raises(ValueError, match="between 0 and 4"):
        discretise(probs, CANDS, budget=5)


def test_discretise_kv_bytes_budget():
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    costs = torch.tensor([100.0, 10.0, 12.0])
    assert [c.name for c in discretise(probs, CANDS, 125, "kv_bytes", costs)] == ["swa8", "full", "swa8"]
    with pytest.raises(ValueError, match="over the budget"):
        discretise(probs, CANDS, 20, "kv_bytes", costs)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_and_sliding_hybrid_loads_with_plain_transformers(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    choices = [Candidate(), Candidate(window=8), Candidate()]
    info = export_hybrid(model, choices, str(tmp_path))
    assert info["loads_with_transformers"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert plain.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    hybrid = load_hybrid(str(tmp_path))
    # the same hybrid through the supernet with one-hot choices
    net = build_supernet(model, [Candidate(), Candidate(window=8)])
    for state, idx in zip(net.states, (0, 1, 0)):
        state.alpha.data = torch.nn.functional.one_hot(torch.tensor(idx), 2).float() * 40
    want = _logits(net.model, ids)
    torch.testing.assert_close(_logits(plain, ids), want, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(hybrid, ids), want, atol=3e-5, rtol=1e-4)


def test_sink_hybrid_needs_the_dash_loader_and_generates(tmp_path):
    model = tiny_model("llama")
    choices = [Candidate(window=8, sink=2), Candidate(), Candidate(window=4)]
    info = export_hybrid(model, choices, str(tmp_path), report={"method": "test"})
    assert not info["loads_with_transformers"]
    saved = json.load(open(tmp_path / "dash_hybrid.json"))
    assert saved["layers"][0] == {"type": "sink_sliding_attention", "window": 8, "sink": 2}
    hybrid = load_hybrid(str(tmp_path))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    out = hybrid.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)


def test_kv_cached_generation_matches_full_recompute(tmp_path):
    """Softmax-family hybrids decode against a KV cache with each layer's mask at the true positions."""
    model = tiny_model("llama")
    choices = [Candidate(window=6, sink=2), Candidate(), Candidate(window=4)]
    export_hybrid(model, choices, str(tmp_path))
    hybrid = load_hybrid(str(tmp_path))
    assert hybrid.generation_config.use_cache
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    cached = hybrid.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    recomputed = hybrid.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)  # past the windows (9 + 8 > 6): masks at the true positions
    # the logits of a cached step equal those of the whole sequence
    with torch.no_grad():
        whole = hybrid(cached, use_cache=False).logits[:, -1]
        prefix = hybrid(cached[:, :-1], use_cache=True)
        step = hybrid(cached[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=2e-5, rtol=1e-4)
