"""Selector baselines on a tiny random model: sizes, determinism, scores, bounds, errors, export."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from dash import Candidate, build_supernet, export_hybrid, load_hybrid  # noqa: E402
from dash.baselines import DUO_STEPS, METHODS, passkey_sequences, select, set_choices  # noqa: E402
from helpers import WordTokenizer  # noqa: E402
from test_supernet import tiny_model  # noqa: E402

EFFICIENT = Candidate(window=4, sink=1)


def _net(**kwargs):
    return build_supernet(tiny_model("llama"), ["full", "swa4", "sink1_swa4"], **kwargs)


def _rows(length=24):
    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(0))


def _answers(rows):
    """An answer mask for calibration rows: the first row stands for a retrieval row, 4 answers near its end."""
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    mask[0, -6:-2] = True
    return mask


PASSKEY_LENGTH = 96  # duo_gate's passkey samples are as long as the rows: room for the prompt and its needle


@pytest.mark.parametrize("method", METHODS)
def test_every_selector_meets_the_budget(method):
    net = _net()
    rows = _rows(PASSKEY_LENGTH if method == "duo_gate" else 24)
    out = select(net, method, 1, EFFICIENT, rows=rows, seed=2, tokenizer=WordTokenizer())
    layers = len(net.states)
    want = {"teacher": layers, "all_efficient": 0}.get(method, 1)
    assert len(out["full_layers"]) == want
    assert [c.name for c in out["choices"]].count("full") == want
    assert all(c == EFFICIENT for i, c in enumerate(out["choices"]) if i not in out["full_layers"])
    if method in ("ppl_drop", "attn_mse", "kl_restore", "duo_gate"):
        assert len(out["scores"]) == layers and out["cost"]["forward_tokens"] > 0
    if method == "duo_gate":  # gates are probabilities, and the logits are left as they were
        assert all(0.0 < g < 1.0 for g in out["scores"])
        assert all(float(s.alpha.detach().abs().max()) == 0.0 for s in net.states)


def test_passkey_samples_are_deterministic_and_end_with_their_answer():
    tok = WordTokenizer()
    a = passkey_sequences(tok, PASSKEY_LENGTH, 3, seed=4)
    b = passkey_sequences(tok, PASSKEY_LENGTH, 3, seed=4)
    assert all(torch.equal(x, y) and s == t for (x, s), (y, t) in zip(a, b))
    assert any(not torch.equal(x, y) for (x, _), (y, _) in zip(a, passkey_sequences(tok, PASSKEY_LENGTH, 3, seed=5)))
    from dash.ruler import generate_samples

    for (ids, start), sample in zip(a, generate_samples(tok, "passkey", PASSKEY_LENGTH - 16, 3, seed=4, words=[])):
        assert len(ids) <= PASSKEY_LENGTH
        # the prompt's own ids, then the answer: the span from `start` predicts the key and reads it back
        assert ids[: start + 1].tolist() == tok(sample.prompt)["input_ids"]
        assert ids[start + 1:].tolist() == tok(f" {sample.answers[0]}.")["input_ids"]
        assert sample.answers[0] in sample.prompt.split("What is the pass key?")[0]


@pytest.mark.parametrize("per_kv_group", [False, True])
def test_duo_gate_learns_one_gate_per_kv_group_deterministically(per_kv_group):
    net = _net(per_kv_group=per_kv_group)
    logits = [s.alpha for s in net.states]
    rows = _rows(PASSKEY_LENGTH)
    out = select(net, "duo_gate", 2, EFFICIENT, rows=rows, seed=0, tokenizer=WordTokenizer())
    gates = torch.tensor(out["gates"])
    assert gates.shape == (3, 2)  # 3 layers x 2 KV-head groups, whatever the supernet's own granularity
    assert (gates - 0.5).abs().min() > 0.05  # every gate trained away from its start, sigmoid(0)
    assert len(set(gates.flatten().tolist())) == gates.numel()  # each group learns its own gate
    torch.testing.assert_close(torch.tensor(out["scores"]), gates.mean(1))
    assert out["full_layers"] == sorted(gates.mean(1).argsort(descending=True)[:2].tolist())
    # the supernet's own logits (the same Parameter objects) come back untouched
    assert all(s.alpha is p and float(p.detach().abs().max()) == 0.0 for s, p in zip(net.states, logits))
    assert all(s.alpha.shape == ((2, 3) if per_kv_group else (3,)) for s in net.states)
    # deterministic by seed; another seed draws other passkey samples, so other gates
    again = select(net, "duo_gate", 2, EFFICIENT, rows=rows, seed=0, tokenizer=WordTokenizer())
    assert again["gates"] == out["gates"] and again["full_layers"] == out["full_layers"]
    assert select(net, "duo_gate", 2, EFFICIENT, rows=rows, seed=1, tokenizer=WordTokenizer())["gates"] != out["gates"]
    # cost: teacher and mixed forward over each passkey sample, one backward; not the calibration rows
    sample_tokens = sum(len(ids) for ids, _ in passkey_sequences(WordTokenizer(), PASSKEY_LENGTH, DUO_STEPS, 0))
    assert out["cost"]["backward_tokens"] == sample_tokens
    assert out["cost"]["forward_tokens"] == 2 * sample_tokens and out["cost"]["passkey_samples"] == DUO_STEPS


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


@pytest.mark.parametrize("method", ["kl_restore", "ppl_drop"])
def test_scoring_selectors_weight_the_answers_as_the_search_does(method):
    """With the rows' answer mask, the loss is the mean plus answer_weight times the answers' mean: scores are
    affine in the weight, weight 0 is the plain mean, and the answers move them."""
    net, rows = _net(), _rows()
    mask = _answers(rows)
    if method == "ppl_drop":
        mask = torch.roll(mask, -1, 1)  # NLL: the prediction at t of token t + 1; the mask's last column unused
    by_weight = {w: torch.tensor(select(net, method, 1, EFFICIENT, rows=rows, answers=mask, answer_weight=w)["scores"])
                 for w in (0.0, 1.0, 2.0)}
    plain = torch.tensor(select(net, method, 1, EFFICIENT, rows=rows)["scores"])
    torch.testing.assert_close(by_weight[0.0], plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(by_weight[2.0] - plain, 2 * (by_weight[1.0] - plain), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(by_weight[1.0], plain)
    with pytest.raises(ValueError, match="answers must be a mask of the calibration rows' shape"):
        select(net, method, 1, EFFICIENT, rows=rows, answers=mask[:1])


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
    with pytest.raises(ValueError, match="must not be full attention"):
        select(net, "first", 1, Candidate())
    with pytest.raises(ValueError, match="needs the tokenizer"):
        select(net, "duo_gate", 1, EFFICIENT, rows=_rows(PASSKEY_LENGTH))
    with pytest.raises(ValueError, match="too short"):
        select(net, "duo_gate", 1, EFFICIENT, rows=_rows(24), tokenizer=WordTokenizer())


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


class CharTokenizer:  # ids fit the tiny model's 97-token vocabulary
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 97 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 32) for i in ids)


def _small_vocabulary(monkeypatch):
    import dash.ruler as ruler

    words = [f"{a}{b}" for a in "abcdefgh" for b in "ijklmnop"]
    original = ruler.generate_samples
    monkeypatch.setattr(ruler, "generate_samples",
                        lambda tok, task, length, n, seed=0: original(tok, task, length, n, seed, words=words))


def _compare_net():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    return build_supernet(model, ["full", "swa4", "sink1_swa4"])


def test_compare_writes_a_table_and_resumes(tmp_path, monkeypatch):
    import json

    from dash.compare import compare
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net = _compare_net()
    rows = _rows()
    kwargs = dict(methods=["first", "random", "kl_restore", "teacher"], random_seeds=(0, 1), search_tokens=96,
                  search_batch=2, lengths=[700], tasks=["passkey"], samples=2, eval_batch=2, output_dir=str(tmp_path),
                  progress=False, search_objectives=["answers", "long_range"],
                  search_relaxations=["mixture", "straight_through"], calibration_answers=_answers(rows))
    out = compare(net, CharTokenizer(), random_data(), rows, rows, [1, 2], EFFICIENT, **kwargs)
    measured = {(r["method"], r["budget"], r["seed"]) for r in out["rows"]}
    assert ("dash", 1, None) in measured and ("random", 2, 1) in measured and ("teacher", 1, None) in measured
    assert ("teacher", 2, None) not in measured  # the bounds do not depend on the budget
    assert all(len(r["ruler_samples"]["passkey"]["700"]) == 2 for r in out["rows"])  # per-sample, for dash.stats
    table = (tmp_path / "compare.md").read_text()
    assert "| dash |" in table and "± " in table and (tmp_path / "compare.png").exists()
    assert "K=1 KV MiB" in table and all(r["kv_cache_mib"] > 0 for r in out["rows"])
    assert "DASH minus each method" in table and "2 samples per task and length" in table
    saved = json.load(open(tmp_path / "compare.json"))
    # the default objective's row is "dash", long_range's the ablation "dash_long_range", the straight-through
    # relaxation's "_st"; "dash" is refined by its own objective ("dash_refined")
    assert set(saved["paired"]) == {"dash_long_range", "dash_st", "dash_long_range_st", "dash_refined", "first",
                                    "random", "kl_restore", "teacher"}
    refined = next(r for r in saved["rows"] if r["method"] == "dash_refined")
    assert refined["cost"]["refine"]["objective"] == "answers"
    assert saved["answer_weight"] == 1.0
    assert saved["paired"]["teacher"]["2"]["resamples"] > 0  # the bound's one row stands for every budget
    # a second run finds every row measured and recomputes none of them
    monkeypatch.setattr("dash.compare.select", lambda *a, **k: pytest.fail("should have resumed"))
    monkeypatch.setattr("dash.search.Search.run", lambda *a, **k: pytest.fail("should have resumed"))
    monkeypatch.setattr("dash.compare._ruler", lambda *a, **k: pytest.fail("should have kept the scores"))
    again = compare(net, CharTokenizer(), random_data(), rows, rows, [1, 2], EFFICIENT, **kwargs)
    assert again["rows"] == saved["rows"]
    # a shard of a sharded comparison: the selectors alone, no DASH search
    monkeypatch.undo()
    _small_vocabulary(monkeypatch)
    monkeypatch.setattr("dash.search.Search.run", lambda *a, **k: pytest.fail("no search in a selectors shard"))
    shard = compare(net, CharTokenizer(), random_data(), rows, rows, [2], EFFICIENT,
                    **dict(kwargs, methods=["first"], output_dir=str(tmp_path / "shard")), include_dash=False)
    assert [(r["method"], r["budget"]) for r in shard["rows"]] == [("first", 2)]
    assert shard["rows"][0]["cost"]["concurrent"] == 1


def test_compare_rescored_from_stored_choices_when_only_evaluation_changes(tmp_path, monkeypatch):
    """More samples later: every hybrid is scored again from its stored choice, with no search or selector."""
    import dash.compare as compare_module
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net, rows = _compare_net(), _rows()
    kwargs = dict(methods=["first", "random"], random_seeds=(0, 1), search_tokens=96, search_batch=2, lengths=[300],
                  tasks=["passkey"], samples=1, output_dir=str(tmp_path), progress=False,
                  calibration_answers=_answers(rows))
    first = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT, **kwargs)
    monkeypatch.setattr(compare_module, "select", lambda *a, **k: pytest.fail("the selection should be reused"))
    monkeypatch.setattr("dash.search.Search.run", lambda *a, **k: pytest.fail("the search should be reused"))
    more = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                  **dict(kwargs, samples=3))
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    before, after = {key(r): r for r in first["rows"]}, {key(r): r for r in more["rows"]}
    assert set(after) == set(before) == {("dash", None), ("dash_refined", None), ("first", None), ("random", 0),
                                         ("random", 1)}
    for k, row in after.items():
        assert row["choice"] == before[k]["choice"] and row["cost"] == before[k]["cost"] and row["reused_choice"]
        assert len(row["ruler_samples"]["passkey"]["300"]) == 3
        # samples are a function of their index: the first one is the same prompt, scored the same
        assert row["ruler_samples"]["passkey"]["300"][0] == before[k]["ruler_samples"]["passkey"]["300"][0]


def test_compare_selects_again_when_the_seed_changes(tmp_path, monkeypatch):
    import dash.compare as compare_module
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net, rows = _compare_net(), _rows()
    kwargs = dict(methods=["first"], search_tokens=96, search_batch=2, lengths=[300], tasks=["passkey"], samples=1,
                  output_dir=str(tmp_path), progress=False, include_dash=False)
    compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT, **kwargs)
    calls = []
    real_select = compare_module.select
    monkeypatch.setattr(compare_module, "select", lambda *a, **k: calls.append(a[1]) or real_select(*a, **k))
    out = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                 **dict(kwargs, seed=1))
    assert calls == ["first"] and "reused_choice" not in out["rows"][0]


def test_resume_rows_sorts_kept_rescored_and_redone(tmp_path):
    import json

    from dash.compare import resume_rows

    settings = {"lengths": [1024], "tasks": ["passkey"], "samples": 10, "seed": 0, "eval_batch": 8,
                "finetune_tokens": 0, "finetune_rank": 8, "finetune_lr": 2e-4}
    row = {"method": "first", "budget": 3, "seed": None, "choice": ["full"]}
    path = tmp_path / "compare.json"
    assert resume_rows(str(path), settings) == ([], {})
    path.write_text(json.dumps({"rows": [row], **settings}))
    assert resume_rows(str(path), settings) == ([row], {})
    for change in ({"samples": 20}, {"lengths": [2048]}, {"tasks": ["vt"]}, {"eval_batch": 1}):
        assert resume_rows(str(path), dict(settings, **change)) == ([], {("first", 3, None): row}), change
    for change in ({"seed": 1}, {"finetune_tokens": 1000}, {"candidates": ["full", "sink64_swa512"]},
                   {"retrieval_fraction": 0.5}, {"calibration_tokens": 65536}, {"answer_weight": 2.0}):
        assert resume_rows(str(path), dict(settings, **change)) == ([], {}), change  # other data: select again
    # without fine-tuning its rank and learning rate do not matter; with it they do
    assert resume_rows(str(path), dict(settings, finetune_rank=4)) == ([row], {})
    path.write_text(json.dumps({"rows": [row], **dict(settings, finetune_tokens=1000)}))
    assert resume_rows(str(path), dict(settings, finetune_tokens=1000, finetune_lr=1e-3)) == ([], {})
    # a file written before samples and seed were recorded: seed 0 (the default), samples unknown
    path.write_text(json.dumps({"rows": [row], "lengths": [1024], "tasks": ["passkey"], "finetune_tokens": 0}))
    assert resume_rows(str(path), settings) == ([], {("first", 3, None): row})


def test_kv_cache_of_a_hybrid_counts_what_each_layer_keeps():
    """SmolLM2's shape at 8K: a full layer keeps 8192 tokens x 3 KV heads x 64 x 2 (K and V) x 2 bytes = 6 MiB,
    64 sinks + a 512 window keep 576 tokens, a 2048 window 2048: a budget of full layers says nothing about
    the windows, the cache does."""
    from types import SimpleNamespace

    from dash.compare import kv_cache_mib

    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576)
    full, sink, wide = Candidate(), Candidate(window=512, sink=64), Candidate(window=2048)
    assert kv_cache_mib(config, [full], 8192) == pytest.approx(6.0)
    assert kv_cache_mib(config, [sink, wide], 8192) == pytest.approx(6.0 * (576 + 2048) / 8192)
    assert kv_cache_mib(config, [full] * 6 + [sink] * 24, 8192) < kv_cache_mib(config, [full] * 6 + [wide] * 24, 8192)


def test_comparison_candidates_are_the_selectors_two():
    from dash.compare import comparison_candidates

    assert [c.name for c in comparison_candidates(8192)] == ["full", "sink64_swa512"]
    assert [c.name for c in comparison_candidates(8192, "swa1024")] == ["full", "swa1024"]
    with pytest.raises(ValueError, match="efficient"):
        comparison_candidates(8192, "full")


def test_compare_with_the_selectors_two_candidates(tmp_path, monkeypatch):
    """`dash compare`'s default: DASH searches over full and the efficient operator only; every hybrid of a
    budget then keeps the same cache, and DASH's search has its own folder (not the default set's)."""
    from dash.compare import compare
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    net = build_supernet(model, ["full", EFFICIENT.name])
    rows = _rows()
    out = compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT, methods=["first"],
                  search_tokens=96, search_batch=2, lengths=[300], tasks=["passkey"], samples=1,
                  output_dir=str(tmp_path), progress=False, refine_rounds=2, calibration_answers=_answers(rows))
    dash_row, first_row = (next(r for r in out["rows"] if r["method"] == m) for m in ("dash", "first"))
    assert set(dash_row["choice"]) <= {"full", EFFICIENT.name} and dash_row["choice"].count("full") == 1
    assert dash_row["kv_cache_mib"] == pytest.approx(first_row["kv_cache_mib"])
    assert len(list(tmp_path.glob(f"search_K1_answers_budget_full+{EFFICIENT.name}_data*"))) == 1
    assert {r["method"] for r in out["rows"]} == {"dash", "dash_refined", "first"}
    refined = next(r for r in out["rows"] if r["method"] == "dash_refined")
    assert refined["choice"].count("full") == 1 and refined["cost"]["refine"]["kl"] <= \
        refined["cost"]["refine"]["searched_kl"]
    assert refined["kv_cache_mib"] == pytest.approx(dash_row["kv_cache_mib"])
    assert "| dash_refined |" in (tmp_path / "compare.md").read_text()


def test_the_calibration_loss_adds_the_answers_mean_nll():
    """dash.baselines._loss with label weights (the answers_nll objective, as the refinement scores it) is the mean
    KL plus answer_weight times the answers' mean NLL (one prompt here: per prompt and per token alike)."""
    import torch.nn.functional as F

    from dash.baselines import _loss, teacher_hidden_states
    from dash.search import prompt_answer_weights

    net, rows = _net(), _rows()
    answers = _answers(rows)
    set_choices(net, [1] * len(net.states))
    teacher = teacher_hidden_states(net, rows)
    plain = _loss(net, rows, teacher, "kl")
    with_nll = _loss(net, rows, teacher, "kl", None, list(prompt_answer_weights(answers, 0.5)))
    with torch.no_grad():
        logits = net.model(rows).logits.float()
    nll = F.cross_entropy(logits[:, :-1][answers[:, :-1]], rows[:, 1:][answers[:, :-1]])
    assert with_nll - plain == pytest.approx(0.5 * nll.item(), rel=1e-4)


def test_refinement_keeps_the_budget_and_never_raises_the_kl():
    from dash.refine import refine_full_layers

    net, rows = _net(), _rows()
    names = [c.name for c in net.candidates]
    full, eff = net.candidates[0], EFFICIENT
    start = [full if i == 0 else eff for i in range(len(net.states))]  # the first layer full
    for objective in ("uniform", "long_range", "answers", "answers_nll"):  # the weighted objective never rises
        out = refine_full_layers(net, start, rows, rounds=2, objective=objective, answers=_answers(rows))
        assert sum(c.is_full for c in out["choices"]) == 1 and all(c.name in names for c in out["choices"])
        assert out["kl"] <= out["searched_kl"] and len(out["swaps"]) <= 2
        if out["swaps"]:
            assert out["choices"][out["swaps"][-1]["now_full"]].is_full
        # the teacher's pass, the all-efficient pass (long_range), the searched hybrid's, (L - 1) swaps a round tried
        rounds_tried = len(out["swaps"]) + (len(out["swaps"]) < 2)
        assert out["cost"]["forward_tokens"] == rows.numel() * (2 + (objective == "long_range") + rounds_tried
                                                                * (len(net.states) - 1))
    with pytest.raises(ValueError, match="objective must be one of"):
        refine_full_layers(net, start, rows, objective="mean")
    with pytest.raises(ValueError, match="objective 'answers_nll' needs the rows' answer mask"):
        refine_full_layers(net, start, rows, objective="answers_nll")
    same = refine_full_layers(net, start, rows, rounds=0)
    assert [c.name for c in same["choices"]] == [c.name for c in start] and same["kl"] == same["searched_kl"]
    with pytest.raises(ValueError, match="rounds"):
        refine_full_layers(net, start, rows, rounds=-1)
    with pytest.raises(ValueError, match="layers"):
        refine_full_layers(net, start[:-1], rows)


def test_an_interrupted_refinement_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Killed after a few hybrids, the rerun measures only the rest and ends where an uninterrupted run does; a
    checkpoint of other rows or another objective is not used."""
    import dash.refine as refine

    net, rows = _net(), _rows()
    eff = EFFICIENT
    start = [net.candidates[0] if i == 0 else eff for i in range(len(net.states))]
    whole = refine.refine_full_layers(net, start, rows, rounds=2)
    path = tmp_path / "refine_kl.json"
    measure, calls = refine._loss, []

    def dies_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(refine, "_loss", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        refine.refine_full_layers(net, start, rows, rounds=2, checkpoint=str(path))
    assert len(json.load(open(path))["kl"]) == 2
    monkeypatch.setattr(refine, "_loss", lambda *a, **k: calls.append(1) or measure(*a, **k))
    calls.clear()
    resumed = refine.refine_full_layers(net, start, rows, rounds=2, checkpoint=str(path))
    assert [c.name for c in resumed["choices"]] == [c.name for c in whole["choices"]]
    assert resumed["kl"] == pytest.approx(whole["kl"]) and len(resumed["swaps"]) == len(whole["swaps"])
    assert resumed["cost"]["forward_tokens"] == whole["cost"]["forward_tokens"]
    measured = len(json.load(open(path))["kl"])
    assert measured > 2
    assert len(calls) == measured - 2  # the two measured before the kill are read, not measured again
    calls.clear()
    refine.refine_full_layers(net, start, rows[:1], rounds=2, checkpoint=str(path))  # other rows: all again
    assert len(calls) == len(json.load(open(path))["kl"])
    calls.clear()
    refine.refine_full_layers(net, start, rows[:1], rounds=2, checkpoint=str(path), objective="answers_nll",
                              answers=_answers(rows[:1]))  # another objective: all again
    assert len(calls) == len(json.load(open(path))["kl"])


def test_a_hybrid_chosen_twice_is_scored_once(tmp_path, monkeypatch):
    """first K=3 of 3 layers is the teacher: the second row takes the first's scores and says whose; a comparison
    with other evaluation settings or without the cache scores it again."""
    import json

    import dash.compare as compare_module
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net, rows = _compare_net(), _rows()
    runs = []
    real = compare_module._ruler
    monkeypatch.setattr(compare_module, "_ruler", lambda *a, **k: runs.append(1) or real(*a, **k))
    kwargs = dict(methods=["first", "teacher"], search_tokens=96, search_batch=2, lengths=[300], tasks=["passkey"],
                  samples=1, output_dir=str(tmp_path / "a"), progress=False, include_dash=False)
    out = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [3], EFFICIENT, **kwargs)
    first, teacher = (next(r for r in out["rows"] if r["method"] == m) for m in ("first", "teacher"))
    assert len(runs) == 1 and first["choice"] == teacher["choice"]
    assert teacher["score_shared_with"] == "first K3" and "score_shared_with" not in first
    assert teacher["ruler_samples"] == first["ruler_samples"] and teacher["perplexity"] == first["perplexity"]
    assert first["eval_seconds"] > 0 and "scored_as" not in first
    compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [3], EFFICIENT,
                           **dict(kwargs, output_dir=str(tmp_path / "b"), score_cache=None))
    assert len(runs) == 3  # no cache: each scored
    compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [3], EFFICIENT,
                           **dict(kwargs, output_dir=str(tmp_path / "c"), score_cache=str(tmp_path / "a" / "scores"),
                                  samples=2))
    assert len(runs) == 4  # other evaluation settings: scored again (once)
    # an earlier comparison's rows, imported: used once the perplexity computed again matches the stored one
    earlier = tmp_path / "a" / "compare.json"
    again = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [3], EFFICIENT,
                                   **dict(kwargs, output_dir=str(tmp_path / "d"), import_scores=[str(earlier)]))
    assert len(runs) == 4
    assert {r["score_shared_with"] for r in again["rows"]} == {f"first K3 of {earlier}"}
    assert [r["ruler_samples"] for r in again["rows"]] == [first["ruler_samples"]] * 2
    doctored = json.loads(earlier.read_text())
    for row in doctored["rows"]:
        row["perplexity"] *= 1.01  # another model or other held-out rows
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [3], EFFICIENT,
                           **dict(kwargs, output_dir=str(tmp_path / "e"),
                                  import_scores=[str(tmp_path / "doctored.json")]))
    assert len(runs) == 5  # the check failed: scored again (once: then the first row's fresh scores serve)


def test_an_earlier_tables_rows_extend_into_a_new_run(tmp_path, monkeypatch):
    """`--import-rows`: the rows of an earlier table that a run would produce are taken, not searched, selected or
    scored again; the refinement starts from the imported DASH row's hybrid, with no search; only what is new
    runs. Another seed (another selection) takes none of them."""
    import dash.compare as compare_module
    from dash.search import Search
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net, rows = _compare_net(), _rows()
    kwargs = dict(search_tokens=96, search_batch=2, lengths=[300], tasks=["passkey"], samples=1, progress=False,
                  calibration_answers=_answers(rows))
    first = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                   **dict(kwargs, methods=["first"], refine_rounds=0, output_dir=str(tmp_path / "a")))
    earlier = str(tmp_path / "a" / "compare.json")
    searched, selected, real_run, real_select = [], [], Search.run, compare_module.select
    monkeypatch.setattr(Search, "run", lambda self, **k: searched.append(self.config.objective) or real_run(self, **k))
    monkeypatch.setattr(compare_module, "select", lambda *a, **k: selected.append(a[1]) or real_select(*a, **k))
    out = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                 **dict(kwargs, methods=["first", "last"], refine_rounds=1, import_rows=[earlier],
                                        search_objectives=["answers", "long_range"], output_dir=str(tmp_path / "b")))
    assert searched == ["long_range"] and selected == ["last"]
    by_method = {r["method"]: r for r in out["rows"]}
    assert set(by_method) == {"dash", "dash_refined", "dash_long_range", "first", "last"}
    for method in ("dash", "first"):
        before = next(r for r in first["rows"] if r["method"] == method)
        assert by_method[method] == dict(before, imported_from=earlier)
    refined = by_method["dash_refined"]
    assert "imported_from" not in refined
    assert refined["cost"]["search_tokens"] == by_method["dash"]["cost"]["search_tokens"]
    assert sum(c == "full" for c in refined["choice"]) == 1
    saved = json.load(open(tmp_path / "b" / "compare.json"))
    assert {r["method"] for r in saved["rows"]} == set(by_method)  # the table holds the imported rows too
    searched.clear(), selected.clear()
    compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                           **dict(kwargs, methods=["first"], refine_rounds=0, import_rows=[earlier], seed=1,
                                  output_dir=str(tmp_path / "c")))
    assert searched == ["answers"] and selected == ["first"]


def test_the_refinement_may_lower_another_objective(tmp_path, monkeypatch):
    """--refine-objective: the refined row of an imported table is refined again by the other objective, from the
    imported DASH row, with its own checkpoint; the DASH row itself is kept."""
    import dash.compare as compare_module
    from dash.search import Search
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    net, rows = _compare_net(), _rows()
    kwargs = dict(methods=[], search_tokens=96, search_batch=2, lengths=[300], tasks=["passkey"], samples=1,
                  progress=False, calibration_answers=_answers(rows), refine_rounds=1)
    first = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                   **dict(kwargs, output_dir=str(tmp_path / "a")))
    assert {r["method"]: r["cost"].get("refine", {}).get("objective") for r in first["rows"]} == \
        {"dash": None, "dash_refined": "answers"}
    monkeypatch.setattr(Search, "run", lambda *a, **k: pytest.fail("the DASH row is imported: no search"))
    out = compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                 **dict(kwargs, output_dir=str(tmp_path / "b"), refine_objective="answers_nll",
                                        import_rows=[str(tmp_path / "a" / "compare.json")]))
    by_method = {r["method"]: r for r in out["rows"]}
    assert "imported_from" in by_method["dash"] and "imported_from" not in by_method["dash_refined"]
    assert by_method["dash_refined"]["cost"]["refine"]["objective"] == "answers_nll"
    assert list((tmp_path / "b").rglob("refine_kl_answers_nll.json"))
    with pytest.raises(ValueError, match="refine_objective"):
        compare_module.compare(net, CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                               **dict(kwargs, output_dir=str(tmp_path / "c"), refine_objective="nll"))


def test_compare_gives_the_searches_their_own_answer_weight(tmp_path, monkeypatch):
    import os

    from dash.compare import compare
    from dash.search import Search
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    rows = _rows()
    seen = []
    real_init = Search.__init__

    def spy(self, net, data, config, output_dir):
        seen.append((config.answer_weight, os.path.basename(output_dir)))
        real_init(self, net, data, config, output_dir)

    monkeypatch.setattr(Search, "__init__", spy)
    out = compare(_compare_net(), CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT, methods=["first"],
                  search_tokens=48, search_batch=2, lengths=[700], tasks=["passkey"], samples=1, eval_batch=1,
                  output_dir=str(tmp_path), progress=False, refine_rounds=0, calibration_answers=_answers(rows),
                  search_answer_weight=4.0)
    assert seen and seen[0][0] == 4.0 and "_aw4_" in seen[0][1]
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["search_answer_weight"] == 4.0 and saved["answer_weight"] == 1.0  # the selectors keep theirs
    assert {r["method"] for r in out["rows"]} == {"dash", "first"}


def test_the_diagnostic_scores_hybrids_on_the_comparisons_calibration_rows(tmp_path, monkeypatch):
    """benchmarks/diagnose_restore_gains.py --calibration: each hybrid's discrete losses on the comparison's own
    calibration rows, as the refinement and ppl_drop compute them (the teacher's hybrid: no KL)."""
    import argparse
    import os
    import sys

    from dash.baselines import _loss, calibration_weights, teacher_hidden_states
    from dash.search import prompt_answer_weights
    from test_search import random_data

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import diagnose_restore_gains as diagnostic

    net = build_supernet(tiny_model("llama"), ["full", "sink1_swa4"])
    rows = _rows()
    answers = _answers(rows)
    monkeypatch.setattr("dash.compare.comparison_data", lambda *a, **k: {
        "data": random_data(), "calibration": rows, "answers": answers, "heldout": rows})
    args = argparse.Namespace(seq_len=24, retrieval_fraction=0.5, calibration_tokens=48, answer_weights=[1.0, 4.0],
                              prompts_per_row=1, answer_first_weights=[1.0, 3.0], device="cpu",
                              json=str(tmp_path / "scores.json"))
    scores = diagnostic.score_calibration(net, None, {"teacher": [0, 1, 2], "one": [1]}, args)
    assert scores["teacher"]["losses"]["1.0"]["answers_kl"] == pytest.approx(0.0, abs=1e-6)
    # the teacher keeps its own greedy margins: no shortfall; a hybrid's margin term adds to its mean KL
    assert scores["teacher"]["losses"]["1.0"]["answers_margin_objective"] == pytest.approx(0.0, abs=1e-6)
    assert scores["one"]["losses"]["1.0"]["answers_margin_objective"] >= scores["one"]["mean_kl"] - 1e-7
    teacher = teacher_hidden_states(net, rows)
    for weight in (1.0, 4.0):  # one pass per hybrid; each weight's losses as the refinement and ppl_drop compute them
        got = scores["one"]["losses"][str(weight)]
        with net.fixed([1, 0, 1]):
            want = _loss(net, rows, teacher, "kl", calibration_weights(answers, weight))
            with_nll = _loss(net, rows, teacher, "kl", None, list(prompt_answer_weights(answers, weight)))
            nll = _loss(net, rows, None, "nll", calibration_weights(answers, weight))
        assert got["answers_kl"] == pytest.approx(want, rel=1e-5) and got["ppl_drop_nll"] == pytest.approx(nll, rel=1e-5)
        assert got["answers_nll_objective"] == pytest.approx(with_nll, rel=1e-5) and with_nll > want > 0
        with net.fixed([1, 0, 1]):  # the first answer position weighted 3x: the same loss with those weights
            first3 = _loss(net, rows, teacher, "kl", None, list(prompt_answer_weights(answers, weight, 3.0)))
        assert got["answers_nll_objective_first3"] == pytest.approx(first3, rel=1e-5)
    assert scores["one"]["losses"]["4.0"]["answers_kl"] > scores["one"]["losses"]["1.0"]["answers_kl"]
    assert json.load(open(tmp_path / "scores.json"))["scores"]["one"]["full_layers"] == [1]



def test_compare_gives_the_first_answer_weight_to_the_objectives_that_weigh_it(tmp_path, monkeypatch):
    """--answer-first-weight: the answers_nll search takes it (a folder of its own), the answers search (which would
    refuse it) and the refinement by answers do not; the answers_nll and answers_margin refinements do, in their
    checkpoints' keys."""
    import os

    import dash.compare as compare_module
    from dash.search import Search
    from test_search import random_data

    _small_vocabulary(monkeypatch)
    rows = _rows()
    seen = []
    real_init = Search.__init__

    def spy(self, net, data, config, output_dir):
        seen.append((config.objective, config.answer_first_weight, os.path.basename(output_dir)))
        real_init(self, net, data, config, output_dir)

    monkeypatch.setattr(Search, "__init__", spy)
    kwargs = dict(methods=["first"], search_tokens=48, search_batch=2, lengths=[700], tasks=["passkey"], samples=1,
                  eval_batch=1, progress=False, refine_rounds=1, calibration_answers=_answers(rows),
                  search_objectives=["answers", "answers_nll"], answer_first_weight=4.0)
    out = compare_module.compare(_compare_net(), CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                                 **dict(kwargs, output_dir=str(tmp_path / "a")))
    (answers, one, plain), (nll, four, own) = seen
    assert (answers, one, nll, four) == ("answers", 1.0, "answers_nll", 4.0)
    assert "_afw" not in plain and "_afw4_" in own
    assert json.load(open(tmp_path / "a" / "compare.json"))["answer_first_weight"] == 4.0
    assert {r["method"] for r in out["rows"]} == {"dash", "dash_answers_nll", "dash_refined", "first"}
    checkpoint = json.load(open(next((tmp_path / "a").rglob("refine_kl.json"))))
    assert "answer_first_weight" not in checkpoint["key"]  # refined by answers, which weighs it as any other
    for refined_by in ("answers_nll", "answers_margin"):  # the prompt objectives' refinements weigh it
        compare_module.compare(_compare_net(), CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                               **dict(kwargs, output_dir=str(tmp_path / refined_by), search_objectives=["answers"],
                                      methods=[], refine_objective=refined_by,
                                      import_rows=[str(tmp_path / "a" / "compare.json")]))
        checkpoint = json.load(open(next((tmp_path / refined_by).rglob(f"refine_kl_{refined_by}.json"))))
        assert checkpoint["key"]["answer_first_weight"] == 4.0 and checkpoint["key"]["objective"] == refined_by
    with pytest.raises(ValueError, match="answer_first_weight must be a finite number > 0"):
        compare_module.compare(_compare_net(), CharTokenizer(), random_data(), rows, rows, [1], EFFICIENT,
                               **dict(kwargs, output_dir=str(tmp_path / "c"), answer_first_weight=0.0))


def test_the_refinement_takes_a_first_answer_weight_only_for_the_prompt_objectives():
    from dash.refine import refine_full_layers

    rows = _rows()
    with pytest.raises(ValueError, match="answer_first_weight 2.0 weights only the .*answers_nll"):
        refine_full_layers(_net(), [], rows, objective="answers", answers=_answers(rows), answer_first_weight=2.0)


def _greedy_rows(net, count=2, length=24):
    """Rows the teacher continues greedily from random prompts: it is right at every position after the prompt, so
    the answers_margin objective has margins to keep there (on random rows it is never right and the term is 0)."""
    rows = torch.randint(0, 97, (count, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), net.teacher():
        while rows.shape[1] < length:  # whole sequences: the supernet keeps no KV cache
            logits = net.model(rows, use_cache=False).logits[:, -1]
            rows = torch.cat([rows, logits.argmax(-1, keepdim=True)], 1)
    return rows


def test_the_refinement_scores_the_answers_margin_objective_as_the_search_does():
    """The refinement's answers_margin loss of a discrete hybrid is the search's loss with that hybrid fixed: the mean
    KL plus each prompt's mean greedy-margin shortfall from the teacher's, first position weighted, on the same rows;
    and a refinement by it never raises it."""
    from dash.baselines import _loss, teacher_hidden_states
    from dash.refine import refine_full_layers
    from dash.search import distillation_kl, next_tokens, prompt_answer_weights

    net = _net()
    rows = _greedy_rows(net)
    answers = torch.zeros(rows.shape, dtype=torch.bool)
    answers[:, 6:-1] = True  # the teacher's own continuation: it is right there, with margins to keep
    head = net.model.get_output_embeddings()
    teacher = teacher_hidden_states(net, rows)
    hybrid = [1, 0, 2]
    weights = prompt_answer_weights(answers, 2.0, 3.0)
    with torch.no_grad(), net.fixed(hybrid):
        got = _loss(net, rows, teacher, "kl", None, list(weights), margin=True)
        kl_alone = _loss(net, rows, teacher, "kl")
        student = net.model.base_model(rows, use_cache=False).last_hidden_state
        want = distillation_kl(student, torch.stack(teacher), head, 7, None, next_tokens(rows).reshape(-1),
                               weights.reshape(-1), margin=True)
    assert got == pytest.approx(float(want), rel=1e-5)
    assert got > kl_alone > 0  # the hybrid falls short of some of the teacher's margins
    start = [net.candidates[i] for i in hybrid]
    out = refine_full_layers(net, start, rows, rounds=1, objective="answers_margin", answers=answers,
                             answer_weight=2.0, answer_first_weight=3.0)
    assert out["searched_kl"] == pytest.approx(got, rel=1e-6) and out["kl"] <= out["searched_kl"]
    assert sum(c.is_full for c in out["choices"]) == 1
