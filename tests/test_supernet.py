"""Supernet surgery on tiny random models of each supported family (CPU, reference backend)."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dash import Candidate, build_supernet, default_candidates, parse_candidates  # noqa: E402

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def tiny_model(family, seed=0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **{**extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def _one_hot(net, index, scale=40.0):
    for state in net.states:
        logits = torch.zeros_like(state.alpha)
        logits[..., index] = scale
        state.alpha.data.copy_(logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_candidate_reproduces_the_teacher(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = model(ids).logits
    net = build_supernet(model, ["swa8", "full", "sink2_swa8"])
    _one_hot(net, 1)
    with torch.no_grad():
        student = net(ids).logits
    torch.testing.assert_close(student, teacher, atol=2e-5, rtol=1e-4)


def test_sliding_window_candidate_matches_a_sliding_window_teacher():
    window = 9
    teacher = tiny_model("mistral", sliding_window=window)
    model = tiny_model("mistral")
    model.load_state_dict(teacher.state_dict())
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = teacher(ids).logits
    net = build_supernet(model, ["full", f"swa{window}"])
    _one_hot(net, 1)
    with torch.no_grad():
        got = net(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("per_kv_group", [False, True])
def test_only_architecture_logits_learn(per_kv_group):
    model = tiny_model("llama")
    net = build_supernet(model, ["full", "swa4", "sink1_swa4"], per_kv_group=per_kv_group, tau=0.7)
    expected = (2, 3) if per_kv_group else (3,)
    assert all(tuple(a.shape) == expected for a in net.arch_parameters())
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    net(ids).logits.float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not any(p is a for a in net.arch_parameters()))
    for alpha in net.arch_parameters():
        assert alpha.grad is not None and torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
    assert net.probabilities().shape == (3, *expected)
    assert len(net.discrete_choice()) == 3


def test_padding_is_a_clear_error():
    net = build_supernet(tiny_model("llama"), ["full", "swa4"])
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="unpadded"):
        net(ids, attention_mask=mask)


def test_teacher_window_caps_candidates():
    model = tiny_model("mistral", sliding_window=16)
    net = build_supernet(model, ["full", "swa8", "swa64"])
    assert net.states[0].windows == [16, 8, 16]


def test_candidates_parse_and_defaults():
    assert [c.name for c in default_candidates(8192)] == ["full", "swa512", "swa2048", "sink64_swa512"]
    assert [c.name for c in default_candidates(100)] == ["full", "swa64"] + ["sink64_swa64"]
    assert Candidate.parse("sink64_swa512") == Candidate(window=512, sink=64)
    assert Candidate.parse({"window": 7}) == Candidate(window=7)
    with pytest.raises(ValueError, match="cannot parse candidate"):
        Candidate.parse("sw512")
    with pytest.raises(ValueError, match="duplicate"):
        parse_candidates(["full", "full"])
    with pytest.raises(ValueError, match="cannot have sinks"):
        Candidate(window=None, sink=4)


def test_kernel_library_imports_neither_dash_nor_transformers():
    code = "import sys, dash_kernels; bad = [m for m in ('dash', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hybrid_teacher_layers_keep_their_own_window():
    """Qwen2 with sliding layers: 'full' means the teacher layer's own window there."""
    model = tiny_model("qwen2", sliding_window=6, use_sliding_window=True, max_window_layers=1)
    ids = torch.randint(0, 97, (1, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        teacher = model(ids).logits
    net = build_supernet(model, ["swa3", "full"])
    assert [s.windows for s in net.states] == [[3, None], [3, 6], [3, 6]]
    _one_hot(net, 1)
    with torch.no_grad():
        student = net(ids).logits
    torch.testing.assert_close(student, teacher, atol=2e-5, rtol=1e-4)


def test_triton_backend_matches_reference_in_the_supernet():
    ids = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(5))
    results = []
    for backend in ("reference", "triton"):
        net = build_supernet(tiny_model("llama"), ["full", "swa5", "sink1_swa5"], backend=backend)
        for state in net.states:
            state.alpha.data.copy_(torch.tensor([0.3, -0.2, 0.5]))
        loss = net(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), [a.grad.clone() for a in net.arch_parameters()]))
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results
    torch.testing.assert_close(loss_tri, loss_ref, atol=1e-5, rtol=1e-5)
    for g_tri, g_ref in zip(grads_tri, grads_ref):
        torch.testing.assert_close(g_tri, g_ref, atol=1e-5, rtol=1e-4)


def test_a_fixed_hybrid_decodes_its_one_candidate_to_the_bit(monkeypatch):
    """Supernet.fixed: a decode step computes only the chosen candidate; the result equals the one-hot mixture's
    decode bit for bit and the whole-sequence forward to fp32 rounding."""
    from dash_kernels.ops.mixed_attention import spec

    model = tiny_model("llama")
    net = build_supernet(model, ["full", "swa4", "sink1_swa4"])
    choice = [0, 2, 1]
    for state, index in zip(net.states, choice):  # the one-hot logits set_choices writes
        with torch.no_grad():
            state.alpha.copy_(torch.full_like(state.alpha, -1e4).index_fill_(-1, torch.tensor(index), 1e4))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    masks = []  # one per candidate computed in a layer's decode step
    original = spec.candidate_mask
    monkeypatch.setattr(spec, "candidate_mask", lambda *a, **k: masks.append(1) or original(*a, **k))

    def last_step():
        with torch.no_grad():
            prefix = model(ids[:, :-1], use_cache=True)
            return model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]

    mixed = last_step()
    assert len(masks) == 3 * 3  # every candidate in every layer
    with net.fixed(choice):
        fixed = last_step()
    assert len(masks) == 3 * 3 + 3  # then one a layer
    assert torch.equal(fixed, mixed)
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(fixed, whole, rtol=1e-4, atol=1e-5)
