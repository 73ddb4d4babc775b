"""Paired bootstrap intervals of `dash compare` (dash.stats) and the tables that show them."""
import json
import random

import pytest

from dash.compare import paired_differences, write_tables
from dash.stats import cell_scores, paired_difference, per_sample_scores, standard_error

TASKS = ["passkey", "vt", "cwe"]
LENGTHS = [1024, 2048]


def _row(method, budget, p, samples=10, seed=None, rng_seed=0):
    """A fake compare row: each sample solved with probability ``p``, scored as ruler.evaluate averages."""
    rng = random.Random(f"{rng_seed}/{method}/{seed}")
    records = [{"task": t, "length": n, "score": float(rng.random() < p)}
               for t in TASKS for n in LENGTHS for _ in range(samples)]
    scores = {t: {n: sum(r["score"] for r in records if (r["task"], r["length"]) == (t, n)) / samples
                  for n in LENGTHS} for t in TASKS}
    average = sum(sum(scores[t][n] for t in TASKS) / len(TASKS) for n in LENGTHS) / len(LENGTHS)
    return {"method": method, "budget": budget, "seed": seed, "ruler_average": average, "ruler": scores,
            "perplexity": 10.0, "ruler_samples": per_sample_scores(records)}


def test_a_clearly_better_method_has_an_interval_above_zero():
    good, bad = _row("dash", 3, 0.9), _row("first", 3, 0.1)
    d = paired_difference(cell_scores([good]), cell_scores([bad]))
    assert d["difference"] == pytest.approx(good["ruler_average"] - bad["ruler_average"])
    assert 0 < d["low"] < d["difference"] < d["high"] and d["excludes_zero"]
    reverse = paired_difference(cell_scores([bad]), cell_scores([good]))
    assert reverse["high"] < 0 and reverse["excludes_zero"]


def test_identical_scores_give_a_zero_interval():
    row = _row("dash", 3, 0.5)
    d = paired_difference(cell_scores([row]), cell_scores([dict(row, method="first")]))
    assert (d["difference"], d["low"], d["high"], d["excludes_zero"]) == (0.0, 0.0, 0.0, False)


def test_one_differing_sample_is_within_the_noise():
    a = _row("dash", 3, 0.5)
    b = json.loads(json.dumps(a))
    b["ruler_samples"]["vt"]["2048"][0] = 1.0 - b["ruler_samples"]["vt"]["2048"][0]
    d = paired_difference(cell_scores([a]), cell_scores([b]))
    assert d["low"] <= 0 <= d["high"] and not d["excludes_zero"]


def test_the_interval_is_reproducible_and_fast():
    import time

    a, b = cell_scores([_row("dash", 3, 0.6)]), cell_scores([_row("first", 3, 0.4)])
    started = time.time()
    assert paired_difference(a, b) == paired_difference(a, b)
    assert time.time() - started < 2.0


def test_random_seeds_are_averaged_sample_by_sample():
    seeds = [_row("random", 3, 0.5, seed=s) for s in range(3)]
    cells = cell_scores(seeds)
    for task in TASKS:
        for n in LENGTHS:
            want = [sum(r["ruler_samples"][task][str(n)][i] for r in seeds) / 3 for i in range(10)]
            assert cells[(task, str(n))].tolist() == pytest.approx(want)
    assert standard_error(cells) > 0


def test_rows_without_per_sample_scores_or_unlike_samples_give_no_interval():
    new, old = _row("dash", 3, 0.5), _row("first", 3, 0.5)
    del old["ruler_samples"]
    assert cell_scores([old]) is None and paired_difference(cell_scores([new]), None) is None
    fewer = _row("first", 3, 0.5, samples=5)
    assert paired_difference(cell_scores([new]), cell_scores([fewer])) is None
    assert cell_scores([new, fewer]) is None  # random's seeds measured differently: no sample-by-sample mean


def test_tables_mark_the_intervals_that_exclude_zero(tmp_path):
    rows = [_row("dash", 3, 0.9), _row("first", 3, 0.1), _row("teacher", 3, 0.9, rng_seed=1),
            _row("dash", 6, 0.5), _row("first", 6, 0.5)]
    old = _row("last", 3, 0.2)
    del old["ruler_samples"]  # a row of a file written before per-sample scores were kept
    rows.append(old)
    out = write_tables(rows, [3, 6], {"samples": 10}, str(tmp_path))
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["paired"]["first"]["3"]["excludes_zero"] and saved["paired"]["last"]["3"] is None
    assert "6" in saved["paired"]["teacher"]  # the bound's one measurement stands for every budget
    assert out["paired"]["first"][3]["difference"] == pytest.approx(rows[0]["ruler_average"] -
                                                                      rows[1]["ruler_average"])
    table = (tmp_path / "compare.md").read_text()
    assert "DASH minus each method" in table and "10 samples per task and length" in table
    first = next(line for line in table.splitlines() if line.startswith("| first |") and "[" in line)
    assert first.split("|")[2].strip().endswith("*")
    paired_part = table.split("DASH minus each method")[1]
    last = next(line for line in paired_part.splitlines() if line.startswith("| last |"))
    assert last.split("|")[2].strip() == "—" and last.split("|")[3].strip() == ""  # not measured at K=6
    main_table = table.split("DASH minus each method")[0]
    main_last = next(line for line in main_table.splitlines() if line.startswith("| last |")).split("|")
    assert main_last[5].strip() == "not measured"  # not K=3's numbers again
    main_teacher = next(line for line in main_table.splitlines() if line.startswith("| teacher |")).split("|")
    assert main_teacher[2] == main_teacher[5]  # a bound stands for every budget
    # the per-sample scores take one line per (task, length) in compare.json
    assert '"1024": [' in (tmp_path / "compare.json").read_text()


def test_old_rows_render_without_intervals(tmp_path):
    rows = [_row("dash", 3, 0.5), _row("first", 3, 0.5)]
    for row in rows:
        del row["ruler_samples"]
    write_tables(rows, [3], {}, str(tmp_path))
    table = (tmp_path / "compare.md").read_text()
    assert "| first | — |" in table.split("DASH minus each method")[1]
    assert paired_differences(rows, [3]) == {"first": {3: None}}
    assert paired_differences([rows[1]], [3]) == {}  # no DASH row: nothing to compare against


def test_cost_and_per_task_tables():
    from dash.compare import cost_table, task_tables

    rows = [{"method": "dash", "budget": 3, "ruler": {"passkey": {"1024": 1.0, "2048": 0.5}, "vt": {"1024": 0.0}},
             "cost": {"search_tokens": 12_300_000, "seconds": 300.0, "concurrent": 1, "device": "NVIDIA H200"}},
            {"method": "first", "budget": 3, "ruler": {"passkey": {"1024": 0.0, "2048": 0.0}, "vt": {"1024": 1.0}},
             "cost": {"forward_tokens": 0, "seconds": 0.0}},
            {"method": "teacher", "budget": 3, "ruler": {"passkey": {"1024": 1.0, "2048": 1.0}}, "cost": {}}]
    costs = cost_table(rows)
    assert "| dash | 12.30M | 5.00 | NVIDIA H200 | 1 |" in costs and "| first | 0.00M | 0.00 | — | — |" in costs
    tables = task_tables(rows, [3, 6])
    assert "| dash | 75 | 0 |" in tables and "| first | 0 | 100 |" in tables
    assert "| teacher | 100 | — |" in tables.split("K=6")[1]  # the bounds stand in every budget's table
