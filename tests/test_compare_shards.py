"""Sharded `dash compare`: the work plan, the scheduler over devices, the merge, and the shards' arguments."""
import json
import sys

import pytest
import torch

from dash.baselines import METHODS
from dash.compare import dash_method, merge_shard_rows, plan_shards, resume_rows, run_sharded, search_settings

ONE = ("answers",)  # one DASH search per budget


def test_plan_measures_the_bounds_once_and_splits_the_selectors():
    shards = plan_shards([3, 6, 9], METHODS, search_objectives=ONE)
    assert [s["name"] for s in shards] == ["K3_dash", "K6_dash", "K9_dash", "K3_selectors", "K6_selectors",
                                           "K9_selectors", "bounds"]
    assert all(s["dash"] and not s["methods"] for s in shards[:3])
    bounds = {"teacher", "all_efficient"}
    assert set(shards[-1]["methods"]) == bounds and shards[-1]["budget"] == 3  # measured once, at the first budget
    selectors = [m for m in METHODS if m not in bounds]
    assert all(s["methods"] == selectors for s in shards[3:6])
    split = plan_shards([3, 6], METHODS, selector_groups=3, search_objectives=ONE)
    names = [s["name"] for s in split]
    assert names == ["K3_dash", "K6_dash", "K3_selectors1", "K3_selectors2", "K3_selectors3", "K6_selectors1",
                     "K6_selectors2", "K6_selectors3", "bounds"]
    for k in (3, 6):  # every selector exactly once per budget, in groups of about equal work
        groups = [s["methods"] for s in split if s["budget"] == k and not s["dash"] and s["name"] != "bounds"]
        assert sorted(m for g in groups for m in g) == sorted(selectors)
        work = [sum(3 if m == "random" else 1 for m in g) for g in groups]
        assert max(work) - min(work) <= 1, groups
    assert [s["name"] for s in plan_shards([2], [], search_objectives=ONE)] == ["K2_dash"]  # DASH alone
    # the default: one search, of the default objective; others are ablation rows, dash_<objective>
    assert [(s["name"], s["dash"]) for s in plan_shards([2], [])] == [("K2_dash", "answers")]
    both = plan_shards([2], [], search_objectives=("answers", "long_range"))
    assert [(s["name"], s["dash"]) for s in both] == [("K2_dash", "answers"), ("K2_dash_long_range", "long_range")]
    relaxed = plan_shards([2], [], search_objectives=("answers", "answers_nll"),
                          search_relaxations=("mixture", "straight_through"))
    assert [(s["name"], s["dash"], s["relaxation"]) for s in relaxed] == [
        ("K2_dash", "answers", "mixture"), ("K2_dash_st", "answers", "straight_through"),
        ("K2_dash_answers_nll", "answers_nll", "mixture"),
        ("K2_dash_answers_nll_st", "answers_nll", "straight_through")]
    assert len(plan_shards([2], ["first"], selector_groups=4, search_objectives=ONE)) == 2  # no empty shards
    with pytest.raises(ValueError, match="selector_groups"):
        plan_shards([2], METHODS, selector_groups=0)


def _fake_shard(shard, device, fail=()):
    """A shard process that writes one row per method (and DASH's), as `dash compare` would."""
    methods = shard["methods"] + ([dash_method(shard["dash"], shard["relaxation"])] if shard["dash"] else [])
    rows = [{"method": m, "budget": shard["budget"], "seed": None, "ruler_average": 0.5, "ruler": {},
             "perplexity": 10.0, "cost": {"device": device}} for m in methods]
    saved = {"rows": rows, **search_settings(), "lengths": [64], "eval_batch": 4}  # as resolved in the shard
    script = (f"import json, os, sys; os.makedirs({shard['folder']!r}, exist_ok=True); "
              f"json.dump({saved!r}, open(os.path.join({shard['folder']!r}, 'compare.json'), 'w')); "
              f"sys.exit({1 if shard['name'] in fail else 0})")
    return [sys.executable, "-c", script]


def test_sharded_run_uses_every_device_and_merges(tmp_path):
    seen = []

    def command(shard, device):
        seen.append((shard["name"], device))
        shard = dict(shard, folder=str(tmp_path / "shards" / shard["name"]))
        return _fake_shard(shard, device)

    out = run_sharded([], [1, 2], ["first", "teacher"], ["cuda:0", "cuda:1"], str(tmp_path), {"lengths": None},
                      poll_s=0.05, progress=False, command=command, search_objectives=ONE)
    assert {d for _, d in seen} == {"cuda:0", "cuda:1"} and len(seen) == 5  # 2 DASH, 2 selectors, the bounds
    measured = {(r["method"], r["budget"]) for r in out["rows"]}
    assert measured == {("dash", 1), ("dash", 2), ("first", 1), ("first", 2), ("teacher", 1)}
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["devices"] == ["cuda:0", "cuda:1"] and len(saved["rows"]) == 5
    assert saved["lengths"] == [64] and saved["eval_batch"] == 4  # the shards' resolved evaluation settings
    assert "| dash |" in (tmp_path / "compare.md").read_text() and (tmp_path / "compare.png").exists()


def test_a_failed_shard_is_named_and_the_rest_is_kept(tmp_path):
    def command(shard, device):
        return _fake_shard(dict(shard, folder=str(tmp_path / "shards" / shard["name"])), device, fail={"K1_dash"})

    with pytest.raises(RuntimeError, match="K1_dash"):
        run_sharded([], [1], ["first"], ["cpu"], str(tmp_path), {}, poll_s=0.05, progress=False, command=command,
                    search_objectives=("answers", "long_range"))
    rows = json.load(open(tmp_path / "compare.json"))["rows"]  # what finished is merged all the same
    assert {r["method"] for r in rows} == {"dash", "dash_long_range", "first"}


def test_merge_keeps_one_row_per_method_budget_seed(tmp_path):
    for name, seeds in [("a", [0, 1]), ("b", [1, 2])]:
        (tmp_path / name).mkdir()
        rows = [{"method": "random", "budget": 3, "seed": s, "ruler_samples": {"vt": {"1024": [s, 1.0]}},
                 "reused_choice": True} for s in seeds]
        (tmp_path / name / "compare.json").write_text(json.dumps({"rows": rows}))
    merged = merge_shard_rows([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "missing")])
    assert sorted(r["seed"] for r in merged) == [0, 1, 2]
    assert all(r["ruler_samples"]["vt"]["1024"] == [r["seed"], 1.0] and r["reused_choice"] for r in merged)


def test_rows_of_another_search_are_searched_again(tmp_path):
    """DASH rows whose search started or moved otherwise (files from before the budget start) are neither merged
    nor resumed; the selectors' rows are kept."""
    rows = [{"method": m, "budget": 3, "seed": None} for m in ("dash", "dash_refined", "dash_long_range", "first")]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "compare.json").write_text(json.dumps({"rows": rows}))  # no search settings: legacy
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "compare.json").write_text(json.dumps({"rows": rows, **search_settings()}))
    assert [r["method"] for r in merge_shard_rows([str(tmp_path / "old")])] == ["first"]
    assert len(merge_shard_rows([str(tmp_path / "new")])) == 4
    settings = {"lengths": [64], "tasks": ["vt"], "samples": 1, "seed": 0, "eval_batch": 1, "finetune_tokens": 0,
                "candidates": None, "refine_rounds": 0, **search_settings()}
    for folder, kept in (("old", ["first"]), ("new", ["dash", "dash_refined", "dash_long_range", "first"])):
        saved = json.loads((tmp_path / folder / "compare.json").read_text())
        saved.update({k: v for k, v in settings.items() if k not in search_settings()})
        (tmp_path / folder / "compare.json").write_text(json.dumps(saved))
        keep, again = resume_rows(str(tmp_path / folder / "compare.json"), settings)
        assert [r["method"] for r in keep] == kept and again == {}


def test_shards_repeat_the_parents_settings():
    from dash.cli import _shard_arguments, build_parser

    parser = build_parser()
    parent = parser.parse_args(["compare", "--budgets", "3", "6", "--lengths", "1024", "2048", "--samples", "7",
                                "--candidates", "full", "swa512", "--devices", "cuda:0", "cuda:0", "--seed", "4",
                                "--import-rows", "a.json", "--import-scores", "b.json",
                                "--refine-objective", "answers_nll", "--search-answer-weight", "4",
                                "--answer-first-weight", "3", "--prompts-per-row", "2"])
    shard = parser.parse_args(["compare", *_shard_arguments(parent), "--budgets", "3", "--methods", "--skip-dash"])
    assert (parent.answer_first_weight, parent.prompts_per_row) == (3.0, 2)
    for name in ("lengths", "samples", "candidates", "seed", "model", "search_tokens", "finetune_tokens",
                 "import_rows", "import_scores", "refine_objective", "search_answer_weight", "answer_first_weight",
                 "prompts_per_row"):
        assert getattr(shard, name) == getattr(parent, name), name
    assert shard.methods == [] and shard.skip_dash and shard.devices is None
    relaxed = parser.parse_args(["compare", "--search-objectives", "answers", "--search-relaxations",
                                 "straight_through"])  # as a shard of a straight-through search is started
    assert relaxed.search_relaxations == ["straight_through"]
    default = parser.parse_args(["compare", "--devices", "cuda:0"])
    assert default.samples == 10  # as compare()'s own default
    assert parser.parse_args(["compare", *_shard_arguments(default), "--budgets", "3"]).samples == 10


def test_an_interrupt_stops_the_shards_and_keeps_what_is_done(tmp_path, monkeypatch):
    import dash.compare as compare_module

    started = []

    def command(shard, device):
        started.append(shard["name"])
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    def interrupt(seconds):
        raise KeyboardInterrupt  # as `timeout -s INT` delivers it

    monkeypatch.setattr(compare_module.time, "sleep", interrupt)
    processes = []
    real_popen = compare_module.subprocess.Popen
    monkeypatch.setattr(compare_module.subprocess, "Popen",
                        lambda *a, **k: processes.append(real_popen(*a, **k)) or processes[-1])
    with pytest.raises(SystemExit, match="rerun the same command to resume"):
        run_sharded([], [1], ["first"], ["cpu"], str(tmp_path), {}, progress=False, command=command)
    assert started == ["K1_dash"] and all(p.poll() is not None for p in processes)  # the shard was stopped
    assert json.load(open(tmp_path / "compare.json"))["rows"] == []


def test_each_shard_sees_only_its_gpu(tmp_path):
    """Triton launches on the current device, so a shard on cuda:1 must see that GPU as its only one."""
    import os

    seen = {}

    def command(shard, device):
        folder = str(tmp_path / "shards" / shard["name"])
        seen[shard["name"]] = device
        script = (f"import json, os; os.makedirs({folder!r}, exist_ok=True); "
                  f"json.dump({{'rows': [], 'env': os.environ.get('CUDA_VISIBLE_DEVICES')}}, "
                  f"open(os.path.join({folder!r}, 'compare.json'), 'w'))")
        return [sys.executable, "-c", script]

    run_sharded([], [1], ["first"], ["cuda:1", "cuda:3"], str(tmp_path), {}, poll_s=0.05, progress=False,
                command=command)
    for name, device in seen.items():
        env = json.load(open(tmp_path / "shards" / name / "compare.json"))["env"]
        assert env == device.split(":")[1], (name, env)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "1"  # the parent's own environment is untouched


def test_the_committed_smollm2_tables_import_into_a_score_cache(tmp_path):
    """The next comparison on SmolLM2 imports these tables' hybrids (`--import-scores`): their recorded evaluation
    settings must be what a shard resolves on a GPU (1K-8K, every task, 10 samples, batch 10)."""
    import os

    from dash.compare import ScoreCache
    from dash.ruler import TASKS

    results = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    shard = {"lengths": [1024, 2048, 4096, 8192], "tasks": list(TASKS), "samples": 10, "eval_batch": 10}
    cache = ScoreCache(str(tmp_path), shard)
    added = [cache.import_rows(os.path.join(results, name))
             for name in ("compare_smollm2_h200.json", "compare_smollm2_h200_1c641e8.json")]
    assert added[0] >= 30 and sum(added) >= 35
    row = json.load(open(os.path.join(results, "compare_smollm2_h200.json")))["rows"][0]
    entry = cache.get(row["choice"], perplexity=lambda: row["perplexity"])  # a matching perplexity: used
    assert entry["ruler_average"] == row["ruler_average"] and entry["scored_as"].endswith("compare_smollm2_h200.json")
    assert cache.get(row["choice"], perplexity=lambda: row["perplexity"] * 1.01) is None  # another model: not
    assert cache.get(row["choice"]) is None  # nothing to check it with: not


def test_the_committed_answers_table_extends_without_its_rows_rerun():
    """The next SmolLM2 comparison (`--import-rows` of this table) keeps its 37 rows: its recorded settings are
    those a GPU shard of the default command resolves (the candidates were added to it by hand: the parent did
    not record them before 2026-11-29)."""
    import os

    from dash.compare import _run_keys, comparison_candidates, resume_rows, search_settings
    from dash.baselines import METHODS
    from dash.ruler import TASKS

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                        "compare_smollm2_h200_answers_1e4b54c.json")
    shard = {"lengths": [1024, 2048, 4096, 8192], "tasks": list(TASKS), "samples": 10, "eval_batch": 10, "seed": 0,
             "finetune_tokens": 0, "finetune_rank": 8, "finetune_lr": 2e-4, "refine_rounds": 2,
             "candidates": [c.name for c in comparison_candidates(8192)], "retrieval_fraction": 0.5,
             "calibration_tokens": 65536, "answer_weight": 1.0, **search_settings()}
    kept, rescore = resume_rows(path, shard)
    assert len(kept) == 37 and rescore == {}
    wanted = set(_run_keys([3, 6, 9], METHODS, (0, 1, 2), ["answers", "answers_nll"], 2))
    missing = wanted - {(r["method"], r["budget"], r["seed"]) for r in kept}
    assert missing == {("dash_refined", 9, None)} | {("dash_answers_nll", k, None) for k in (3, 6, 9)}


def test_a_search_answer_weight_of_its_own_searches_again_and_keeps_the_selectors(tmp_path):
    """--search-answer-weight: the DASH rows of a table made with the selectors' weight are searched again, the
    selectors' rows are taken; a table made with that weight keeps its DASH rows too."""
    rows = [{"method": m, "budget": 3, "seed": None, "choice": [], "cost": {}} for m in ("dash", "dash_st", "first")]
    base = {"lengths": [64], "tasks": ["vt"], "samples": 1, "seed": 0, "eval_batch": 1, "finetune_tokens": 0,
            "candidates": None, "refine_rounds": 0}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": rows, **base, **search_settings()}))
    own = dict(base, **search_settings(10.0))
    kept, again = resume_rows(str(old), own)
    assert [r["method"] for r in kept] == ["first"] and again == {}
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"rows": rows, **own}))
    assert [r["method"] for r in resume_rows(str(new), own)[0]] == ["dash", "dash_st", "first"]
    assert [r["method"] for r in resume_rows(str(new), dict(base, **search_settings()))[0]] == ["first"]
    # the shards' rows: those of a search with another answer weight are stale
    for name, budget, saved in (("a", 3, own), ("b", 6, dict(base, **search_settings()))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps({"rows": [dict(rows[0], budget=budget)], **saved}))
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [(r["method"], r["budget"]) for r in merge_shard_rows(folders, search_settings(10.0))] == [("dash", 3)]
    assert [(r["method"], r["budget"]) for r in merge_shard_rows(folders)] == [("dash", 6)]


def test_a_first_answer_weight_searches_again_and_other_prompts_a_row_select_again(tmp_path):
    """--answer-first-weight: only the DASH rows of a table made without it (before it was recorded: weighted
    evenly) are searched again; --prompts-per-row: other data, every row is selected again."""
    rows = [{"method": m, "budget": 3, "seed": None, "choice": [], "cost": {}}
            for m in ("dash", "dash_answers_nll", "first")]
    base = {"lengths": [64], "tasks": ["vt"], "samples": 1, "seed": 0, "eval_batch": 1, "finetune_tokens": 0,
            "candidates": None, "refine_rounds": 0}
    before = {k: v for k, v in search_settings().items() if k != "answer_first_weight"}
    assert search_settings()["answer_first_weight"] == 1.0
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": rows, **base, **before}))
    everything = ["dash", "dash_answers_nll", "first"]
    assert [r["method"] for r in resume_rows(str(old), dict(base, **search_settings()))[0]] == everything
    assert [r["method"] for r in resume_rows(str(old), dict(base, **search_settings(None, 4.0)))[0]] == ["first"]
    assert [r["method"] for r in resume_rows(str(old), dict(base, **search_settings(), prompts_per_row=1))[0]] == \
        everything
    assert resume_rows(str(old), dict(base, **search_settings(), prompts_per_row=3)) == ([], {})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "compare.json").write_text(json.dumps({"rows": rows, **base, **before}))
    assert [r["method"] for r in merge_shard_rows([str(tmp_path / "a")], search_settings(None, 4.0))] == ["first"]
    assert [r["method"] for r in merge_shard_rows([str(tmp_path / "a")])] == everything


def test_a_retrieval_task_mix_is_resolved_once_and_every_shard_builds_it(tmp_path, monkeypatch):
    """--retrieval-tasks: explicit task:weight specs reach every shard; 'solved' asks the teacher once, in the
    parent, and the shards and the table get its weights; a table of another mix is selected again."""
    import dash.ruler as ruler
    from dash.cli import _data_settings, _resolve_compare_tasks, _shard_arguments, build_parser

    parser = build_parser()
    parent = parser.parse_args(["compare", "--devices", "cpu", "--retrieval-tasks", "passkey:2", "niah_single_1"])
    _resolve_compare_tasks(parent)
    shard = parser.parse_args(["compare", *_shard_arguments(parent), "--budgets", "3", "--skip-dash"])
    assert shard.retrieval_tasks == parent.retrieval_tasks == ["passkey:2", "niah_single_1:1"]
    asked = []
    monkeypatch.setattr(ruler, "teacher_task_weights",
                        lambda model, tok, length, n, seed=0, **_: asked.append((length, n, seed))
                        or {"passkey": 0.875, "niah_single_1": 1.0})
    solved = parser.parse_args(["compare", "--devices", "cpu", "--retrieval-tasks", "solved", "--seq-len", "2048",
                                "--seed", "3"])
    _resolve_compare_tasks(solved, model=torch.nn.Linear(1, 1), tokenizer=object())
    assert asked == [(1024, 8, 3)]  # half a 2K row (one prompt a row), 8 prompts a task, the run's seed
    assert solved.retrieval_tasks == ["passkey:0.875", "niah_single_1:1"]
    assert _data_settings(solved)["retrieval_tasks"] == ["passkey:0.875", "niah_single_1:1"]
    for bad, message in ((["solved", "vt"], "'solved' stands alone"), (["qa"], "unknown task 'qa'")):
        with pytest.raises(SystemExit, match=f"--retrieval-tasks: {message}"):
            _resolve_compare_tasks(parser.parse_args(["compare", "--retrieval-tasks", *bad]))
    rows = [{"method": m, "budget": 3, "seed": None, "choice": [], "cost": {}} for m in ("dash", "first")]
    base = {"lengths": [64], "tasks": ["vt"], "samples": 1, "seed": 0, "eval_batch": 1, "finetune_tokens": 0,
            "candidates": None, "refine_rounds": 0, **search_settings()}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": rows, **base}))  # made before the mix was recorded: every task in turn
    assert [r["method"] for r in resume_rows(str(old), dict(base, retrieval_tasks=None))[0]] == ["dash", "first"]
    assert resume_rows(str(old), dict(base, retrieval_tasks=solved.retrieval_tasks)) == ([], {})
