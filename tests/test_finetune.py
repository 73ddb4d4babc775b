"""`dash finetune` on tiny random models: the loss drops, the output loads and generates, a killed run resumes to
the same weights, bad input is named, and `dash compare` fine-tunes every hybrid the same way."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dash import Candidate, build_supernet, export_hybrid, load_hybrid  # noqa: E402
from dash.finetune import Finetune, FinetuneConfig, LoRALinear, finetune_hybrid  # noqa: E402
from test_search import random_data  # noqa: E402
from test_supernet import tiny_model  # noqa: E402

CHOICES = [Candidate(window=4, sink=1), Candidate(), Candidate(window=4)]
FAST = dict(tokens=8 * 2 * 24, lr=1e-2, rank=4, batch_size=2, device="cpu", progress=False)  # 8 steps


def _tokenizer():
    """A real (tokenizers-backed) tokenizer with ids inside the tiny model's vocabulary, for load_model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{chr(33 + i): 2 + i for i in range(94)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def _hybrid(tmp_path, choices=CHOICES, candidates=None, record_teacher=True, init=0.1):
    """(teacher dir, hybrid dir): a tiny teacher saved with its tokenizer, and a hybrid exported from it. ``init``:
    weights wider than the default 0.02, so the teacher's distributions are far from uniform and the hybrid's
    distance to them (the KL the fine-tuning lowers) is well above noise."""
    teacher_dir, hybrid_dir = tmp_path / "teacher", tmp_path / "hybrid"
    model = tiny_model("llama", initializer_range=init)
    model.save_pretrained(teacher_dir)
    _tokenizer().save_pretrained(teacher_dir)
    linear = None
    if candidates:  # linear candidates: export needs their modules
        net = build_supernet(model, candidates)
        linear = [s.linear for s in net.states]
        model.set_attn_implementation("sdpa")
        for layer in net.layers:
            del layer.dash
    export_hybrid(model, choices, str(hybrid_dir), tokenizer=_tokenizer(),
                  report={"model": str(teacher_dir)} if record_teacher else None, linear_modules=linear)
    return str(teacher_dir), str(hybrid_dir)


def _kl(model, teacher, rows):
    """Mean per-token KL(teacher || model), computed directly from both models' logits."""
    with torch.no_grad():
        t = torch.log_softmax(teacher(rows, use_cache=False).logits.float(), -1)
        s = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_finetune_lowers_the_loss_and_writes_a_loadable_hybrid(tmp_path):
    teacher_dir, hybrid_dir = _hybrid(tmp_path)
    data = random_data()
    done = finetune_hybrid(hybrid_dir, data=data, **FAST)
    assert done["finished"] and done["output"] == hybrid_dir + "-ft" and done["steps"] == 8
    assert done["adapted_layers"] == [0, 2] and done["linear_layers"] == []
    # 4 projections of 2 layers, rank 4: A [4, in] + B [out, 4] (q/o 64x64, k/v 32x64 with 2 of 4 KV heads)
    assert done["trained_parameters"] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    before, after = load_hybrid(hybrid_dir), load_hybrid(done["output"])
    assert _kl(after, teacher, data.train) < 0.85 * _kl(before, teacher, data.train)
    # only the non-full layers' projections changed; everything else is the teacher's
    old, new = _weights(hybrid_dir), _weights(done["output"])
    changed = sorted(k for k in old if not torch.equal(old[k], new[k]))
    assert changed == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 2) for p in "qkvo")
    out = after.generate(data.train[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    meta = json.load(open(f"{done['output']}/dash_hybrid.json"))
    assert meta["report"] == {"model": teacher_dir} and meta["teacher_model_type"] == "llama"
    record = meta["finetune"][-1]
    assert record["teacher"] == teacher_dir and record["tokens"] == 8 * 2 * 24 and record["rank"] == 4
    # the held-out distance it reports is the exported models' own
    assert record["heldout_kl_before"] == pytest.approx(_kl(before, teacher, data.heldout), rel=1e-4)
    assert record["heldout_kl_after"] == pytest.approx(_kl(after, teacher, data.heldout), rel=1e-4)


def test_linear_candidates_train_and_export(tmp_path):
    choices = [Candidate(kind="gla"), Candidate(), Candidate(window=4)]
    _, hybrid_dir = _hybrid(tmp_path, choices, candidates=["full", "swa4", "gla"])
    done = finetune_hybrid(hybrid_dir, data=random_data(), **{**FAST, "tokens": 2 * 2 * 24})
    assert done["linear_layers"] == [0]
    from safetensors.torch import load_file

    old = load_file(f"{hybrid_dir}/dash_linear.safetensors")
    new = load_file(f"{done['output']}/dash_linear.safetensors")
    assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)
    hybrid = load_hybrid(done["output"])
    assert hybrid.generate(random_data().train[:1, :8], max_new_tokens=2, do_sample=False).shape == (1, 10)


def test_killed_finetune_resumes_to_the_same_weights(tmp_path):
    _, hybrid_dir = _hybrid(tmp_path)
    data = random_data()
    straight = finetune_hybrid(hybrid_dir, str(tmp_path / "a"), data=data, **FAST)
    first = finetune_hybrid(hybrid_dir, str(tmp_path / "b"), data=data, stop_after=3, **FAST)  # "killed"
    assert not first["finished"] and first["steps"] == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = finetune_hybrid(hybrid_dir, str(tmp_path / "b"), data=data, **FAST)
    assert resumed["finished"] and resumed["steps"] == straight["steps"] == 8
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.load(open(tmp_path / "b" / "finetune_history.json"))["history"]
    assert [h["step"] for h in history] == list(range(1, 9))


def test_lora_merge_is_the_adapted_projection():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    lora = LoRALinear(base, 3, torch.Generator().manual_seed(1))
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), base(x))  # B starts at zero: the hybrid itself
    with torch.no_grad():
        lora.lora_b.normal_()
    merged = torch.nn.functional.linear(x, lora.merged_weight(), base.bias)
    torch.testing.assert_close(merged, lora(x), atol=1e-5, rtol=1e-5)
    lora.enabled = False
    torch.testing.assert_close(lora(x), base(x))


def test_bad_input_is_named(tmp_path):
    from dash.cli import main

    teacher_dir, hybrid_dir = _hybrid(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an exported hybrid"):
        finetune_hybrid(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(FileNotFoundError, match="not an exported hybrid"):
        main(["finetune", str(tmp_path / "missing"), "--device", "cpu"])
    with pytest.raises(ValueError, match="tokens must be an int >= 1, got 0"):
        main(["finetune", hybrid_dir, "--tokens", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="tokens must be an int >= 1, got -5"):
        finetune_hybrid(hybrid_dir, tokens=-5, device="cpu")
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        main(["finetune", hybrid_dir, "--rank", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="lr must be > 0"):
        finetune_hybrid(hybrid_dir, lr=0.0, device="cpu")
    with pytest.raises(ValueError, match="is the input hybrid"):
        finetune_hybrid(hybrid_dir, hybrid_dir, device="cpu")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        finetune_hybrid(hybrid_dir, seq_len=4096, device="cpu")
    _, unrecorded = _hybrid(tmp_path / "other", record_teacher=False)
    with pytest.raises(ValueError, match="does not record its teacher"):
        finetune_hybrid(unrecorded, device="cpu")
    # the same hybrid with the teacher given explicitly runs
    done = finetune_hybrid(unrecorded, teacher=teacher_dir, data=random_data(), **{**FAST, "tokens": 48})
    assert done["finished"] and done["steps"] == 1


def test_all_full_hybrid_has_nothing_to_train(tmp_path):
    model = tiny_model("llama")
    net = build_supernet(model, ["full", "swa4"])
    tuner = Finetune(model, [Candidate()] * 3, random_data(), FinetuneConfig(tokens=96, batch_size=2),
                     str(tmp_path), lambda batch: None)
    assert tuner.steps == 0 and tuner.run(progress=False)["tokens"] == 0
    assert net.states[0].alpha.requires_grad


def test_compare_fine_tunes_every_hybrid_the_same_way(tmp_path, monkeypatch):
    import dash.compare as compare_module
    import dash.ruler as ruler
    from helpers import WordTokenizer

    original = ruler.generate_samples
    monkeypatch.setattr(ruler, "generate_samples",
                        lambda tok, task, length, n, seed=0: original(tok, task, length, n, seed, words=["ab"]))
    model = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    net = build_supernet(model, ["full", "swa4", "sink1_swa4"])
    adapted_at_scoring = []
    perplexity = compare_module._perplexity

    def spy(net_, rows):  # which layers carry adapters while the hybrid is scored
        adapted_at_scoring.append([isinstance(layer.q_proj, LoRALinear) for layer in net_.layers])
        return perplexity(net_, rows)

    monkeypatch.setattr(compare_module, "_perplexity", spy)
    rows = random_data().train[:2]
    # one DASH row (no ablation, no refined row): they are not what this test is about
    kwargs = dict(methods=["first", "teacher"], search_tokens=48, search_batch=2, lengths=[96], tasks=["passkey"],
                  samples=1, output_dir=str(tmp_path), progress=False, finetune_tokens=96, finetune_rank=2,
                  search_objectives=["answers"], refine_rounds=0)
    out = compare_module.compare(net, WordTokenizer(), random_data(), rows, rows, [1],
                                 Candidate(window=4, sink=1), **kwargs)
    by_method = {r["method"]: r for r in out["rows"]}
    assert set(by_method) == {"dash", "first", "teacher"}
    for method in ("dash", "first"):  # 2 efficient layers adapted, 2 steps of 2 x 24 tokens each
        cost = by_method[method]["finetune"]
        assert cost["tokens"] == 96 and cost["trained_parameters"] == 2 * 2 * (2 * (64 + 64) + 2 * (64 + 32))
        assert cost["seconds"] > 0 and cost["train_kl_first"] > 0 and cost["train_kl_last"] > 0
    assert by_method["teacher"]["finetune"]["tokens"] == 0  # all full: nothing to fine-tune
    assert adapted_at_scoring == [[c != "full" for c in by_method[m]["choice"]] for m in ("dash", "first", "teacher")]
    assert adapted_at_scoring[1] == [False, True, True]
    # the adapters are gone and the teacher's weights untouched after every row
    assert all(not isinstance(layer.q_proj, LoRALinear) for layer in net.layers)
    state = {k: v for k, v in model.state_dict().items() if ".dash." not in k}
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["finetune_tokens"] == 96 and "fine-tuned on 96 tokens" in (tmp_path / "compare.md").read_text()
    # more samples: every hybrid is scored again, its fine-tuning loaded from its completed checkpoint
    monkeypatch.setattr(compare_module, "select", lambda *a, **k: pytest.fail("should have resumed"))
    monkeypatch.setattr("dash.finetune.Finetune.loss", lambda *a, **k: pytest.fail("fine-tuned again"))
    more = compare_module.compare(net, WordTokenizer(), random_data(), rows, rows, [1], Candidate(window=4, sink=1),
                                  **{**kwargs, "samples": 2})
    for row in more["rows"]:
        assert row["reused_choice"] and row["finetune"] == by_method[row["method"]]["finetune"]
        assert len(row["ruler_samples"]["passkey"]["96"]) == 2
    assert adapted_at_scoring[3:] == adapted_at_scoring[:3]  # the same adapters were in place when scored
    monkeypatch.undo()
    monkeypatch.setattr(ruler, "generate_samples",
                        lambda tok, task, length, n, seed=0: original(tok, task, length, n, seed, words=["ab"]))
    # rows measured with another fine-tuning budget are not reused
    monkeypatch.setattr(compare_module, "select", lambda *a, **k: pytest.fail("should have resumed"))
    with pytest.raises(pytest.fail.Exception):
        compare_module.compare(net, WordTokenizer(), random_data(), rows, rows, [1], Candidate(window=4, sink=1),
                               **{**kwargs, "finetune_tokens": 48})
