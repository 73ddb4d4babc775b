"""Stage-2 search on a tiny random model: losses, regulariser, checkpoint/resume, data packing."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from dash import build_supernet  # noqa: E402
from dash.data import PackedData, pack, read_documents, synthetic_documents  # noqa: E402
from dash.search import (Search, SearchConfig, answer_weights, budget_prior, distillation_kl,  # noqa: E402
                         efficient_reference,
                         expected_cost, long_range_weights)
from test_supernet import tiny_model  # noqa: E402


def random_data(rows=12, seq_len=24, seed=0):
    """Random rows; every other one stands for a retrieval row, with 4 answer positions near its end."""
    gen = torch.Generator().manual_seed(seed)
    answers = torch.zeros(rows, seq_len, dtype=torch.bool)
    answers[::2, seq_len - 6:seq_len - 2] = True
    return PackedData(train=torch.randint(0, 97, (rows, seq_len), generator=gen),
                      heldout=torch.randint(0, 97, (2, seq_len), generator=gen), train_answers=answers)


def make_search(tmp_path, steps=6, **overrides):
    net = build_supernet(tiny_model("llama"), ["full", "swa4", "sink1_swa4"])
    data = random_data()
    settings = dict(tokens=steps * 2 * data.seq_len, batch_size=2, lr=0.1, checkpoint_every=2, kl_chunk_tokens=16,
                    budget=1)
    cfg = SearchConfig(**dict(settings, **overrides))
    return Search(net, data, cfg, str(tmp_path))


def test_chunked_kl_matches_the_direct_computation():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    s, t = torch.randn(2, 7, 8, requires_grad=True), torch.randn(2, 7, 8)
    direct = torch.nn.functional.kl_div(torch.log_softmax(head(s), -1), torch.log_softmax(head(t), -1),
                                        log_target=True, reduction="sum") / 14
    for chunk in (3, 100):
        torch.testing.assert_close(distillation_kl(s, t, head, chunk), direct)


def test_weighted_kl_and_the_long_range_weights():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    s, t = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    per_token = torch.nn.functional.kl_div(torch.log_softmax(head(s), -1), torch.log_softmax(head(t), -1),
                                           log_target=True, reduction="none").sum(-1).flatten()
    w = torch.rand(14)
    torch.testing.assert_close(distillation_kl(s, t, head, 3, w), (w * per_token).sum() / 14)
    torch.testing.assert_close(distillation_kl(s, t, head, 3, torch.ones(14)), distillation_kl(s, t, head, 3))
    with pytest.raises(ValueError, match="weights must have shape"):
        distillation_kl(s, t, head, 3, torch.ones(13))
    # the weights: the efficient model's KL to the teacher per token, mean 1; where it matches, uniform
    e = t.clone()
    e[0, 3] = torch.randn(8) * 4  # the one token where the efficient model is off
    weights = long_range_weights(e, t, head, 4)
    assert weights.shape == (14,) and weights.mean().item() == pytest.approx(1.0)
    assert weights.argmax().item() == 3 and weights[3] > 10 * weights[torch.arange(14) != 3].max()
    torch.testing.assert_close(long_range_weights(t, t, head, 4), torch.ones(14))


def test_answer_weights_add_the_answers_mean_to_the_mean():
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    answers = torch.tensor([False, False, False, False, True, True])
    weights = answer_weights(answers, 0.5)
    assert float((weights * kl).mean()) == pytest.approx(kl.mean().item() + 0.5 * 15.0)
    assert torch.equal(answer_weights(torch.zeros(6, dtype=torch.bool), 0.5), torch.ones(6))  # no answers: the mean
    assert answer_weights(answers.view(2, 3), 1.0).shape == (2, 3)


def test_the_answers_nll_loss_is_the_mean_kl_plus_the_prompts_mean_answer_nll():
    from dash.search import distillation_kl, next_tokens, prompt_answer_weights

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 11)
    student, teacher = torch.randn(3, 7, 8, generator=gen), torch.randn(3, 7, 8, generator=gen)
    ids = torch.randint(0, 11, (3, 7), generator=gen)
    answers = torch.zeros(3, 7, dtype=torch.bool)
    answers[0, 2:5] = answers[2, 5] = True  # positions whose next token is an answer's; row 1: text only
    s_logp, t_logp = (torch.log_softmax(head(h), -1) for h in (student, teacher))
    mean_kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    nll = -s_logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [3, 6]: each position's NLL of its next token
    per_prompt = (nll[0, 2:5].mean() + nll[2, 5]) / 2  # a 3-token answer and a 1-token one count alike
    weights = prompt_answer_weights(answers, 0.5)
    got = distillation_kl(student, teacher, head, 5, labels=next_tokens(ids).reshape(-1),
                          label_weights=weights.reshape(-1))
    assert got.item() == pytest.approx((mean_kl + 0.5 * per_prompt).item(), rel=1e-5)
    assert distillation_kl(student, teacher, head, 5).item() == pytest.approx(mean_kl.item(), rel=1e-5)
    assert torch.equal(prompt_answer_weights(torch.zeros(2, 4, dtype=torch.bool), 0.5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="a run of answer positions in a row"):
        prompt_answer_weights(answers.reshape(-1), 0.5)
    with pytest.raises(ValueError, match="labels and label_weights go together"):
        distillation_kl(student, teacher, head, 5, labels=next_tokens(ids).reshape(-1))
    with pytest.raises(ValueError, match="label_weights must have shape"):
        distillation_kl(student, teacher, head, 5, labels=next_tokens(ids).reshape(-1),
                        label_weights=torch.ones(3))


def test_prompt_answer_weights_by_default_are_the_one_prompt_a_row_formula():
    """Rows of one prompt each (or none): the weights are, bit for bit, those of the formula before prompts were
    runs, answer_weight * flags / (the row's answer positions) * N / (rows with answers)."""
    from dash.search import prompt_answer_weights

    gen = torch.Generator().manual_seed(0)
    for rows, length in ((5, 9), (8, 64), (1, 3)):
        answers = torch.zeros(rows, length, dtype=torch.bool)
        for r in range(rows):
            if torch.rand((), generator=gen) < 0.7:  # some rows are text alone
                first = int(torch.randint(0, length, (), generator=gen))
                last = int(torch.randint(first, length, (), generator=gen))
                answers[r, first:last + 1] = True
        for weight in (0.0, 0.5, 1.0, 3.0):
            flags = answers.float()
            per_row = flags.sum(-1, keepdim=True)
            before = weight * flags / per_row.clamp_min(1.0) * (flags.numel() / (per_row > 0).sum().clamp_min(1))
            assert torch.equal(prompt_answer_weights(answers, weight), before)
            assert torch.equal(prompt_answer_weights(answers, weight, 1.0), before)


def test_prompt_answer_weights_count_each_run_as_a_prompt_and_weigh_its_first_position():
    from dash.search import prompt_answer_weights

    answers = torch.tensor([[0, 1, 1, 0, 0, 1],    # two prompts in a row: positions 1-2 and 5
                            [1, 1, 0, 0, 0, 0]],   # one, which begins where the row before ends: another prompt
                           dtype=torch.bool)
    # N 12, 3 prompts: each prompt's weights sum to answer_weight * 12 / 3 = 4
    assert prompt_answer_weights(answers, 1.0).tolist() == [[0, 2, 2, 0, 0, 4], [2, 2, 0, 0, 0, 0]]
    four = prompt_answer_weights(answers, 1.0, answer_first_weight=4.0)  # first 4/5 of the prompt, then 1/5
    torch.testing.assert_close(four, torch.tensor([[0, 3.2, 0.8, 0, 0, 4], [3.2, 0.8, 0, 0, 0, 0]]))
    torch.testing.assert_close(prompt_answer_weights(answers, 0.5, 4.0), four / 2)
    torch.testing.assert_close(prompt_answer_weights(answers, 1.0, 0.25),  # (0.25, 1) / 1.25: 0.8, 3.2
                               torch.tensor([[0, 0.8, 3.2, 0, 0, 4], [0.8, 3.2, 0, 0, 0, 0]]))
    # the weighted mean of a per-position term: answer_weight times the mean over prompts of their weighted means
    term = torch.arange(12.0).view(2, 6)
    per_prompt = [(4 * 1 + 2) / 5, 5.0, (4 * 6 + 7) / 5]
    assert float((four * term).mean()) == pytest.approx(sum(per_prompt) / 3)
    assert torch.equal(prompt_answer_weights(torch.zeros(2, 4, dtype=torch.bool), 1.0, 4.0), torch.zeros(2, 4))
    meta = prompt_answer_weights(answers.to("meta"), 1.0, 4.0)  # tensor ops only: no host read of the mask
    assert meta.device.type == "meta" and meta.shape == (2, 6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="answer_first_weight must be a finite number > 0"):
            prompt_answer_weights(answers, 1.0, bad)


def test_the_margin_shortfall_keeps_the_teachers_greedy_decisions():
    from dash.search import MARGIN_CAP, answer_margin_shortfall, greedy_margin

    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 2.5], [1.0, 1.0, -4.0]])
    assert greedy_margin(logits, torch.tensor([0, 1, 1])).tolist() == pytest.approx([2.0, -0.5, 0.0])
    teacher = torch.tensor([[0.6, 0.0, -1.0],   # a near-tie the teacher wins by 0.6
                            [9.0, 0.0, 0.0],    # a safe token: the target is the cap, not 9
                            [0.0, 1.0, 0.0]])   # the teacher is wrong here: nothing to keep
    student = torch.tensor([[0.0, 0.2, -1.0], [3.0, 0.0, 0.0], [0.0, 5.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0])
    got = answer_margin_shortfall(student, teacher, labels)
    assert got.tolist() == pytest.approx([0.6 + 0.2, 0.0, 0.0])  # 3 - 0 >= the cap of 2: no shortfall
    assert MARGIN_CAP == 2.0
    got.sum().backward()  # pushes the true logit up and the runner-up down, nothing else
    assert student.grad.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_the_answers_margin_loss_is_the_mean_kl_plus_the_prompts_mean_shortfall():
    from dash.search import answer_margin_shortfall, distillation_kl, next_tokens, prompt_answer_weights

    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(8, 11)
    student, teacher = torch.randn(3, 7, 8, generator=gen), torch.randn(3, 7, 8, generator=gen)
    ids = torch.randint(0, 11, (3, 7), generator=gen)
    answers = torch.zeros(3, 7, dtype=torch.bool)
    answers[0, 2:5] = answers[2, 5] = True
    s_logits, t_logits = head(student), head(teacher)
    s_logp, t_logp = (torch.log_softmax(x, -1) for x in (s_logits, t_logits))
    mean_kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    labels = next_tokens(ids)
    short = answer_margin_shortfall(s_logits.reshape(-1, 11), t_logits.reshape(-1, 11), labels.reshape(-1)).view(3, 7)
    per_prompt = (short[0, 2:5].mean() + short[2, 5]) / 2
    got = distillation_kl(student, teacher, head, 5, labels=labels.reshape(-1),
                          label_weights=prompt_answer_weights(answers, 0.5).reshape(-1), margin=True)
    assert got.item() == pytest.approx((mean_kl + 0.5 * per_prompt).item(), rel=1e-5)


def test_the_answers_objective_needs_answers_and_a_checkpoint_its_own_data(tmp_path):
    net = build_supernet(tiny_model("llama"), ["full", "swa4"])
    plain = random_data()
    plain.train_answers = None
    config = SearchConfig(tokens=4 * 24, batch_size=2, budget=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="objective 'answers' needs retrieval rows"):
        Search(net, plain, config, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="objective 'answers_nll' needs retrieval rows"):
        Search(net, plain, SearchConfig(tokens=4 * 24, batch_size=2, budget=1, objective="answers_nll"),
               str(tmp_path / "a"))
    Search(net, random_data(), config, str(tmp_path / "b")).run(progress=False, stop_after=1)
    with pytest.raises(ValueError, match="made on other training data"):
        Search(net, random_data(seed=1), config, str(tmp_path / "b")).run(progress=False)
    with pytest.raises(ValueError, match="answer_weight must be >= 0"):
        Search(net, random_data(), SearchConfig(answer_weight=-1.0), str(tmp_path / "c"))


def test_the_first_answer_weight_is_its_objectives_own_and_a_checkpoints_own(tmp_path, monkeypatch):
    net = build_supernet(tiny_model("llama"), ["full", "swa4"])
    for objective in ("answers", "uniform", "long_range"):  # they would ignore it: say so
        with pytest.raises(ValueError, match=f"answer_first_weight 4.0 weights only .* not '{objective}'"):
            Search(net, random_data(), SearchConfig(objective=objective, answer_first_weight=4.0), str(tmp_path))
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="answer_first_weight must be a finite number > 0"):
            Search(net, random_data(), SearchConfig(objective="answers_nll", answer_first_weight=bad), str(tmp_path))
    assert SearchConfig().answer_first_weight == 1.0
    import dash.search as search_module

    rows, seen, real = torch.arange(4), [], search_module.prompt_answer_weights
    monkeypatch.setattr(search_module, "prompt_answer_weights", lambda *a: seen.append(a[2:]) or real(*a))
    for objective in ("answers_nll", "answers_margin"):  # the loss weighs the answers' first positions more
        even = make_search(tmp_path / f"{objective}_1", steps=2, objective=objective)
        first = make_search(tmp_path / f"{objective}_4", steps=2, objective=objective, answer_first_weight=4.0)
        batch, answers = even.data.train[rows], even.data.answers(rows)
        with torch.no_grad():
            losses = [search.loss_terms(batch, answers)["kl"] for search in (even, first)]
        assert seen[-2:] == [(1.0,), (4.0,)]
        if objective == "answers_nll":  # (the margin's shortfall is 0 here: the random teacher is never right)
            assert losses[0] != losses[1]
        even.run(progress=False)
        first.run(progress=False)

    def resume(name, **overrides):
        make_search(tmp_path / name, steps=2, objective="answers_nll", **overrides).run(progress=False)

    with pytest.raises(ValueError, match="answer_first_weight 4.0, not 1.0"):
        resume("answers_nll_4")
    with pytest.raises(ValueError, match="answer_first_weight 1.0, not 2.0"):
        resume("answers_nll_1", answer_first_weight=2.0)
    # a checkpoint from before the setting: weighted evenly
    path = tmp_path / "answers_nll_1" / "search_state.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["answer_first_weight"]
    torch.save(state, path)
    resume("answers_nll_1")
    with pytest.raises(ValueError, match="answer_first_weight 1.0, not 4.0"):
        resume("answers_nll_1", answer_first_weight=4.0)


def test_fixed_choice_computes_that_hybrid_and_leaves_the_logits():
    from dash.baselines import set_choices

    net = build_supernet(tiny_model("llama"), ["full", "swa4", "sink1_swa4"])
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    alphas = [a.detach().clone() for a in net.arch_parameters()]
    assert efficient_reference(net) == [1, 1, 1]  # swa4: the least cache (sink1_swa4 keeps one more row)
    # a window before a (smaller) linear state; the linear candidate only where there is no window
    assert efficient_reference(build_supernet(tiny_model("llama"), ["full", "gla", "swa8"])) == [2, 2, 2]
    assert efficient_reference(build_supernet(tiny_model("llama"), ["full", "gla"])) == [1, 1, 1]
    with torch.no_grad(), net.fixed([0, 1, 2]):
        got = net(ids).logits
    assert all(torch.equal(a, b) for a, b in zip(alphas, net.arch_parameters()))
    assert all(s.forced is None for s in net.states)
    set_choices(net, [0, 1, 2])
    with torch.no_grad():
        want = net(ids).logits
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="3 layers"):
        with net.fixed([0]):
            pass


def test_objectives_search_apart_and_a_resume_keeps_the_time(tmp_path):
    answers = make_search(tmp_path / "a").run(progress=False)  # answers, the default
    uniform = make_search(tmp_path / "u", objective="uniform").run(progress=False)
    weighted = make_search(tmp_path / "w", objective="long_range").run(progress=False)
    nll = make_search(tmp_path / "n", objective="answers_nll").run(progress=False)
    margin = make_search(tmp_path / "m", objective="answers_margin").run(progress=False)
    assert uniform["probabilities"] != weighted["probabilities"] != answers["probabilities"]
    assert nll["probabilities"] not in (answers["probabilities"], uniform["probabilities"])
    assert margin["probabilities"] not in (nll["probabilities"], uniform["probabilities"])
    assert uniform["probabilities"] != answers["probabilities"]
    with pytest.raises(ValueError, match="objective 'long_range', not 'uniform'"):
        make_search(tmp_path / "w", objective="uniform").run(progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        make_search(tmp_path / "x", objective="mean")
    with pytest.raises(ValueError, match="answer_weight 1.0, not 2.0"):
        make_search(tmp_path / "a", answer_weight=2.0).run(progress=False)
    first = make_search(tmp_path / "r")
    first.run(progress=False, stop_after=4)
    spent = torch.load(first.state_path, weights_only=False)["elapsed_s"]  # as of its last checkpoint
    again = make_search(tmp_path / "r").run(progress=False)  # resumed: its time adds to the first run's
    assert spent > 0
    assert again["timing"]["total_search_s"] == pytest.approx(spent + again["timing"]["search_s"])


def test_the_search_starts_at_the_budget(tmp_path):
    """init="budget": every layer starts at the maximum-entropy mix whose expected cost is the budget."""
    two = budget_prior(torch.tensor([1.0, 0.0]), 9, 30)
    torch.testing.assert_close(two, torch.tensor([0.3, 0.7]))
    four = budget_prior(torch.tensor([1.0, 0.0, 0.0, 0.0]), 3, 30)  # the cheap ones share the rest equally
    torch.testing.assert_close(four, torch.tensor([0.1, 0.3, 0.3, 0.3]))
    cache = torch.tensor([8192.0, 512.0, 2048.0, 576.0])  # kv_bytes: cheaper candidates get more
    mix = budget_prior(cache, 30 * 1500.0, 30)
    assert float((mix * cache).sum()) == pytest.approx(1500.0, rel=1e-4) and mix[1] > mix[3] > mix[2] > mix[0]
    assert torch.equal(budget_prior(torch.tensor([1.0, 0.0]), 20, 30), torch.tensor([0.5, 0.5]))  # within budget
    assert budget_prior(torch.tensor([1.0, 0.0]), 0, 30)[0] == pytest.approx(1e-3, rel=1e-2)  # a floor stays
    search = make_search(tmp_path / "b", budget=0.6)  # full, swa4, sink1_swa4 in 3 layers: p_full = 0.2
    assert expected_cost(search.net, search.costs).item() == pytest.approx(0.6, rel=1e-5)
    torch.testing.assert_close(search.net.probabilities(), torch.tensor([[0.2, 0.4, 0.4]] * 3))
    uniform = make_search(tmp_path / "u", budget=0.6, init="uniform")
    torch.testing.assert_close(uniform.net.probabilities()[0], torch.full((3,), 1 / 3))
    search.run(progress=False, stop_after=2)
    with pytest.raises(ValueError, match="init 'budget', not 'uniform'"):  # a checkpoint resumes only its own
        make_search(tmp_path / "b", budget=0.6, init="uniform").run(progress=False)
    with pytest.raises(ValueError, match="lr 0.1, not 0.2"):
        make_search(tmp_path / "b", budget=0.6, lr=0.2).run(progress=False)
    with pytest.raises(ValueError, match="init must be one of"):
        make_search(tmp_path / "x", init="zeros")


def test_teacher_mode_is_the_unmodified_model():
    model = tiny_model("mistral", sliding_window=5)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    net = build_supernet(model, ["swa2", "full"])
    with torch.no_grad(), net.teacher():
        got = net(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_search_runs_and_writes_history(tmp_path):
    search = make_search(tmp_path)
    summary = search.run(progress=False)
    assert summary["steps"] == search.steps == 6
    assert len(summary["choice"]) == 3
    history = json.load(open(os.path.join(tmp_path, "history.json")))["history"]
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["tau"] < history[0]["tau"]


def test_cost_regulariser_pushes_toward_the_budget(tmp_path):
    search = make_search(tmp_path, steps=8, cost_weight=50.0, init="uniform")  # from half full, over budget
    search.config.budget = 0.0
    before = search.net.probabilities()[:, 0].sum().item()
    search.run(progress=False)
    after = search.net.probabilities()[:, 0].sum().item()
    assert after < before  # expected number of full-attention layers went down


def test_completed_search_returns_at_once_from_its_checkpoint(tmp_path, monkeypatch):
    """`dash compare` reruns rely on it: a finished search is loaded, not trained again."""
    done = make_search(tmp_path)
    want = done.run(progress=False)
    again = make_search(tmp_path)
    monkeypatch.setattr(Search, "loss_terms", lambda *a, **k: pytest.fail("a completed search trained again"))
    got = again.run(progress=False)
    assert got["steps"] == want["steps"] and got["choice"] == want["choice"] and got["tokens"] == want["tokens"]
    assert got["timing"]["steps_this_run"] == 0
    for a, b in zip(done.net.arch_parameters(), again.net.arch_parameters()):
        assert torch.equal(a, b)


def test_killed_search_resumes_to_the_same_logits(tmp_path):
    straight = make_search(tmp_path / "a")
    straight.run(progress=False)
    first = make_search(tmp_path / "b")
    first.run(progress=False, stop_after=3)  # "killed" after 3 steps (checkpoint at step 2 and 3)
    resumed = make_search(tmp_path / "b")
    resumed.run(progress=False)
    for a, b in zip(straight.net.arch_parameters(), resumed.net.arch_parameters()):
        assert torch.equal(a, b)
    assert len(resumed.history) == 6


def test_bad_budget_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="between 0 and 3 full-attention layers"):
        Search(
            build_supernet(tiny_model("llama"), ["full", "swa4"]), random_data(),
            SearchConfig(budget=7, batch_size=2), str(tmp_path))


def test_packing_is_deterministic_and_splits_heldout(tmp_path):
    class CharTokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(ch) % 90) for ch in text]}

    docs = synthetic_documents([f"word{i}" for i in range(60)], num_docs=9, approx_words=40, seed=3)
    a = pack(docs, CharTokenizer(), 32, seed=5, heldout_fraction=0.1)
    b = pack(docs, CharTokenizer(), 32, seed=5, heldout_fraction=0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.heldout.shape[0] >= 1 and a.train.shape[1] == 32
    assert torch.equal(a.batch(7, 4, seed=1), b.batch(7, 4, seed=1))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("hello world")
    (tmp_path / "d" / "two.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    assert sorted(read_documents([str(tmp_path / "d")])) == ["from jsonl", "hello world"]
    with pytest.raises(FileNotFoundError):
        read_documents([str(tmp_path / "missing")])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            read_documents(["hf:some/corpus"])


def test_cli_settings_precedence(tmp_path):
    import argparse

    from dash.cli import _search_parser, resolve_search_settings

    cfg = tmp_path / "search.yaml"
    cfg.write_text("tokens: 1000\nseq_len: 64\nbudget: 3\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _search_parser(sub)
    settings = resolve_search_settings(parser.parse_args(["search", "--config", str(cfg), "--budget", "5",
                                                          "--device", "cpu"]))
    assert settings["tokens"] == 1000 and settings["seq_len"] == 64 and settings["budget"] == 5
    assert settings["dtype"] == "float32" and settings["model"] == "smollm2-135m-instruct"
    assert settings["prompts_per_row"] == 1 and "answer_first_weight" not in settings  # SearchConfig's default
    settings = resolve_search_settings(parser.parse_args(["search", "--config", str(cfg), "--prompts-per-row", "3",
                                                          "--answer-first-weight", "4", "--objective",
                                                          "answers_nll"]))
    assert settings["prompts_per_row"] == 3 and settings["answer_first_weight"] == 4.0
    cfg.write_text("tokenz: 5\n")
    with pytest.raises(SystemExit, match="unknown settings"):
        resolve_search_settings(parser.parse_args(["search", "--config", str(cfg)]))


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
    search = make_search(tmp_path)
    (tmp_path / "search_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable DASH checkpoint"):
        search.run(progress=False)
    assert (tmp_path / "search_state.pt").read_bytes() == b"not a checkpoint"


def test_unknown_architecture_and_missing_bank_are_clear_errors(tmp_path):
    from dash.align import load_bank

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no attention layers"):
        build_supernet(gpt2)
    net = build_supernet(tiny_model("llama"), ["full", "gla"])
    with pytest.raises(FileNotFoundError, match="bank incomplete"):
        load_bank(net, str(tmp_path))


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    from dash.models import load_model

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no-such-hybrid"))


def test_compiled_stateless_modules_give_the_same_search(tmp_path):
    """compile_modules: the norms and MLPs run through torch.compile; the loss and the logits' gradients match the
    eager step, and only stateless modules were compiled (the attention layers stay eager)."""
    from dash.search import compile_stateless_modules

    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        search = make_search(tmp_path / str(compiled), compile_modules=compiled)
        loss = search.loss_terms(ids, search.data.answers(torch.arange(2)))["loss"]
        loss.backward()
        results.append((loss.detach(), [a.grad.clone() for a in search.net.arch_parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    model = tiny_model("llama")
    assert compile_stateless_modules(model) == 2 * model.config.num_hidden_layers + 1 + model.config.num_hidden_layers


def test_sampled_hybrids_are_drawn_as_the_export_makes_them():
    from collections import Counter

    from dash.candidates import parse_candidates
    from dash.export import discretise, sample_discrete

    candidates = parse_candidates(["full", "swa4", "sink1_swa4"])
    probs = torch.tensor([[0.99, 0.005, 0.005], [0.5, 0.25, 0.25], [0.5, 0.4, 0.1], [0.01, 0.01, 0.98]])
    fulls = Counter()
    for seed in range(400):
        draw = sample_discrete(probs, candidates, 2, torch.Generator().manual_seed(seed))
        assert draw == sample_discrete(probs, candidates, 2, torch.Generator().manual_seed(seed))  # by the seed
        assert sum(c == 0 for c in draw) == 2  # exactly K full layers, the export's count
        fulls.update(i for i, c in enumerate(draw) if c == 0)
    # by the odds: the decided layer nearly always full, the two undecided ones about half the draws each
    assert fulls[0] > 390 and 150 < fulls[1] < 250 and 150 < fulls[2] < 250 and fulls[3] < 10
    decided = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    assert sample_discrete(decided, candidates, 2, torch.Generator().manual_seed(0)) == \
        [candidates.index(c) for c in discretise(decided, candidates, 2)]
    per_group = decided[:, None].expand(4, 2, 3)  # [L, Hkv, C]: whole layers, as the export
    assert sample_discrete(per_group, candidates, 2, torch.Generator().manual_seed(0)) == [0, 1, 2, 0]
    costs = torch.tensor([100.0, 4.0, 5.0])  # kv_bytes: full layers while the bytes allow
    draw = sample_discrete(probs, candidates, 215.0, torch.Generator().manual_seed(0), "kv_bytes", costs)
    assert sum(float(costs[c]) for c in draw) <= 215.0 and sum(c == 0 for c in draw) == 2


def test_straight_through_forward_is_the_sampled_hybrid_and_its_gradient_the_mixtures():
    net = build_supernet(tiny_model("llama"), ["full", "swa4", "sink1_swa4"])
    with torch.no_grad():
        for i, alpha in enumerate(net.arch_parameters()):
            alpha.copy_(torch.randn(3, generator=torch.Generator().manual_seed(i)))
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    choice = [0, 2, 1]
    with torch.no_grad(), net.fixed(choice):
        want = net(ids).logits
    one_hots = [torch.nn.functional.one_hot(torch.tensor(c), 3).float() for c in choice]
    with net.sampled(one_hots):
        got = net(ids).logits
        got.float().pow(2).mean().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the forward is exactly the discrete hybrid
    assert all(s.sample is None for s in net.states)
    # the gradient of each weight is <dO, O_c>: the logits get the softmax's chain of it, nonzero for all
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.arch_parameters())
    with pytest.raises(ValueError, match="logits' shape"):
        with net.sampled([torch.zeros(2)] * 3):
            pass


def test_straight_through_search_runs_resumes_and_keeps_its_own_checkpoint(tmp_path):
    straight = make_search(tmp_path / "a", relaxation="straight_through")
    summary = straight.run(progress=False)
    mixture = make_search(tmp_path / "m").run(progress=False)
    assert summary["probabilities"] != mixture["probabilities"]
    assert straight.sampled_hybrid(3) == straight.sampled_hybrid(3)  # a function of the logits, seed and step
    first = make_search(tmp_path / "b", relaxation="straight_through")
    first.run(progress=False, stop_after=3)
    resumed = make_search(tmp_path / "b", relaxation="straight_through")
    resumed.run(progress=False)
    for a, b in zip(straight.net.arch_parameters(), resumed.net.arch_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="relaxation 'straight_through', not 'mixture'"):
        make_search(tmp_path / "b").run(progress=False)
    with pytest.raises(ValueError, match="relaxation must be one of"):
        make_search(tmp_path / "x", relaxation="hard")
