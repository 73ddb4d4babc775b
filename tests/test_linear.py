"""The teacher-aligned linear candidate: in the mixture, stage-1 alignment, bank, export."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from dash import Candidate, build_supernet, export_hybrid, load_hybrid  # noqa: E402
from dash.align import Align, AlignConfig, load_bank  # noqa: E402
from dash.search import Search, SearchConfig  # noqa: E402
from test_search import random_data  # noqa: E402
from test_supernet import tiny_model  # noqa: E402

CANDS = ["full", "swa4", "gla"]


def test_linear_candidates_in_the_mixture_get_gradients():
    net = build_supernet(tiny_model("llama"), ["full", "swa4", "gla", "gdn"])
    ids = torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(0))
    net(ids).logits.float().pow(2).mean().backward()
    for alpha in net.arch_parameters():
        assert torch.isfinite(alpha.grad).all() and (alpha.grad[2:].abs() > 0).all()  # gla and gdn logits learn


def test_full_one_hot_still_reproduces_the_teacher_with_a_linear_candidate():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = model(ids).logits
    net = build_supernet(model, CANDS)
    for state in net.states:
        state.alpha.data = torch.tensor([40.0, 0.0, 0.0])
    with torch.no_grad():
        got = net(ids).logits
    torch.testing.assert_close(got, teacher, atol=2e-5, rtol=1e-4)


def _align(tmp_path, steps, stop_after=None):
    net = build_supernet(tiny_model("llama"), ["full", "gla", "gdn"])
    data = random_data(rows=10, seq_len=32)
    cfg = AlignConfig(tokens=steps * 2 * 32, batch_size=2, lr=3e-2, checkpoint_every=2)
    align = Align(net, data, cfg, str(tmp_path), model_name="tiny")
    return net, align, align.run(progress=False, stop_after=stop_after)


def test_alignment_lowers_the_error_and_resumes(tmp_path):
    net, align, meta = _align(tmp_path / "a", steps=8)
    losses = [h["loss"] for h in align.history]
    assert losses[-1] < losses[0]
    assert meta["kinds"] == ["gla", "gdn"] and meta["steps"] == 8
    assert all(len(meta["heldout_relative_error"][kind]) == 3 for kind in ("gla", "gdn"))
    _align(tmp_path / "b", steps=8, stop_after=5)
    net_b, _, _ = _align(tmp_path / "b", steps=8)
    for pa, pb in zip(net.linear_parameters(), net_b.linear_parameters()):
        assert torch.equal(pa, pb)
    # the bank loads into a fresh supernet and the search keeps it frozen
    fresh = build_supernet(tiny_model("llama"), ["full", "swa4", "gla", "gdn"])
    load_bank(fresh, str(tmp_path / "a"), model_name="tiny")
    for pa, pb in zip(net.linear_parameters(), fresh.linear_parameters()):
        assert torch.equal(pa, pb)
    Search(fresh, random_data(), SearchConfig(tokens=48, batch_size=2, budget=1), str(tmp_path / "s")).run(
        progress=False)
    for pa, pb in zip(net.linear_parameters(), fresh.linear_parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="aligned on 'tiny'"):
        load_bank(fresh, str(tmp_path / "a"), model_name="other")
    # a bank without the kind the supernet asks for is refused by name
    from safetensors.torch import load_file, save_file

    from dash.align import BANK_WEIGHTS

    weights = str(tmp_path / "a" / BANK_WEIGHTS)
    save_file({k: v for k, v in load_file(weights).items() if ".gdn." not in k}, weights)
    with pytest.raises(ValueError, match="has no aligned 'gdn' candidate"):
        load_bank(build_supernet(tiny_model("llama"), ["full", "gdn"]), str(tmp_path / "a"), model_name="tiny")


@pytest.mark.parametrize("kind", ["gla", "gdn"])
def test_hybrid_with_a_linear_layer_exports_and_reloads(tmp_path, kind):
    model = tiny_model("llama")
    net = build_supernet(model, ["full", "swa4", kind])
    with torch.no_grad():
        for p in net.linear_parameters():
            p.add_(0.01 * torch.randn_like(p))
    picks = (0, 2, 1)
    for state, idx in zip(net.states, picks):
        state.alpha.data = torch.nn.functional.one_hot(torch.tensor(idx), 3).float() * 40
    ids = torch.randint(0, 97, (1, 22), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(ids).logits
    linear = [s.linear for s in net.states]  # per layer: kind -> module
    model.set_attn_implementation("sdpa")
    choices = [Candidate(), Candidate(kind=kind), Candidate(window=4)]
    info = export_hybrid(model, choices, str(tmp_path), linear_modules=linear)
    assert not info["loads_with_transformers"]
    assert json.load(open(tmp_path / "dash_hybrid.json"))["layers"][1] == {"type": "linear_attention", "kind": kind}
    hybrid = load_hybrid(str(tmp_path))
    with torch.no_grad():
        got = hybrid(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    assert hybrid.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 25)
