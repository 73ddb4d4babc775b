"""DASH against the selector baselines at several budgets: one command, one table.

For every budget K (full-attention layers): a DASH search per objective (``dash.search``: row ``dash`` the default,
the ``answers`` weighting of the KL, ``dash_uniform`` and ``dash_long_range`` the ablations; its own budget
regulariser, the same search-token budget for all K), then every selector of ``dash.baselines`` (random over several seeds), each hybrid scored by
RULER-style tasks and held-out perplexity on the same samples. Every hybrid is evaluated in place through the
supernet with one-hot logits, which computes exactly what its exported model computes (the export path turns
the same choices into the model directory). Writes ``compare.json``, ``compare.md`` and ``compare.png``.

Every row keeps its per-sample RULER scores (``ruler_samples``). RULER samples depend only on (task, length,
index, seed), so all methods answer the same prompts: ``compare.md`` adds DASH minus each method with a 95%
paired bootstrap interval (``dash.stats``), also under ``"paired"`` in ``compare.json``. Rerunning resumes: rows
of the same settings are kept; with other evaluation settings (samples, lengths, tasks, eval batch) each stored
hybrid is scored again from its ``choice``, with no search or selector run; other selection settings (seed,
fine-tuning) select and fine-tune again.

With ``finetune_tokens > 0`` every hybrid (DASH's, each selector's and the bounds') is first fine-tuned the same way
(``dash.finetune.Finetune``: LoRA on the non-full layers' projections, distilled toward the teacher on the search's
training text, in place in the supernet with its teacher mode as the teacher), scored, and its adapters dropped;
each row records that fine-tuning's cost under ``"finetune"``.

  dash compare --budgets 3 6 9 --output runs/compare          (a GPU: the full comparison)
  dash compare --budgets 3 6 9 --finetune-tokens 1000000 --output runs/compare-ft
  dash compare --budgets 3 6 9 --devices cuda:0 cuda:1 cuda:2 cuda:3   (shards in parallel, then one table)

Sharded (``--devices``): the work splits into shards, per budget the DASH search and the selectors, each run
by its own ``dash compare`` process on the next free device (one device may be named more than once: the
SmolLM2 search step is host-bound, so two processes share a GPU well), each resumable in its own folder
under ``shards/``; the parent merges their rows into one ``compare.json``/``.md``/``.png``. Wall-clock costs
in the rows are those of the shard's process (``cost["concurrent"]`` says how many ran at once).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from statistics import mean, pstdev
from typing import Dict, List, Optional, Sequence

import torch

from .baselines import METHODS, _loss, select, set_choices
from .candidates import Candidate, default_candidates
from .data import tensor_digest
from .search import (ANSWER_OBJECTIVES, FIRST_WEIGHT_OBJECTIVES, OBJECTIVES, RELAXATIONS, Search, SearchConfig,
                     candidate_cache_bytes, save_json)
from .stats import cell_scores, paired_difference, per_sample_scores, standard_error


class ScoreCache:
    """Scores of hybrids by what they compute: the layers' choices under the evaluation settings (and the held-out
    rows). Methods that choose the same layers build the same hybrid, which answers the same prompts the same way
    (greedy decoding): DASH's refined hybrid is its searched one when no swap helps, a selector may pick DASH's
    layers, and the selectors that read no data (uniform, random, first, last, the bounds) choose as in any earlier
    comparison. Such a row takes the first scoring's numbers (and says whose) instead of another RULER run. One
    JSON file per hybrid in ``folder``, shared by the shards of a sharded comparison.

    Entries carry the digest of the held-out rows they were scored with. ``import_rows`` adds an earlier
    compare.json's rows without one: such an entry is used only after the hybrid's held-out perplexity, computed
    again (seconds), matches the stored one (``PERPLEXITY_MATCH``), which checks model, held-out rows and choice."""

    PERPLEXITY_MATCH = 2e-3  # relative; bf16 perplexities of the same hybrid agree to ~1e-4 between runs

    def __init__(self, folder: Optional[str], settings: Dict, heldout: Optional[torch.Tensor] = None):
        self.folder = folder
        self.evaluation = json.dumps({key: settings[key] for key in EVALUATION_SETTINGS}, sort_keys=True)
        self.heldout = None if heldout is None else tensor_digest(heldout)

    def _path(self, choice: Sequence[str]) -> Optional[str]:
        import hashlib

        if self.folder is None:
            return None
        key = hashlib.sha1((self.evaluation + json.dumps(list(choice))).encode()).hexdigest()[:20]
        return os.path.join(self.folder, key + ".json")

    def get(self, choice: Sequence[str], perplexity=None) -> Optional[Dict]:
        """The stored scores of this hybrid, or None. ``perplexity``: a callable giving the hybrid's held-out
        perplexity now, to check an imported entry (without it, imported entries are not used)."""
        path = self._path(choice)
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            entry = json.load(f)
        scored_on = entry.pop("heldout", None)
        if scored_on is not None and scored_on == self.heldout:
            return entry
        if entry.pop("imported", False) and perplexity is not None:
            now = perplexity()
            if abs(now - entry["perplexity"]) <= self.PERPLEXITY_MATCH * entry["perplexity"]:
                return dict(entry, perplexity=now)
        return None

    def put(self, choice: Sequence[str], scores: Dict, imported: bool = False) -> None:
        path = self._path(choice)
        if path is None:
            return
        entry = dict(scores, imported=True) if imported else dict(scores, heldout=self.heldout)
        save_json(path, entry)  # another shard may write the same hybrid's scores at the same time

    def import_rows(self, path: str) -> int:
        """Adds the rows of the compare.json at ``path`` measured under the same evaluation settings (fine-tuned
        rows excluded; ``path`` names them in the rows that use them); an entry already there is kept. Returns how
        many were added."""
        with open(path) as f:
            saved = json.load(f)
        if json.dumps({key: _saved(saved, key) for key in EVALUATION_SETTINGS}, sort_keys=True) != self.evaluation:
            return 0
        if _saved(saved, "finetune_tokens"):
            return 0
        added = 0
        for row in saved["rows"]:
            if "ruler_samples" not in row or self._path(row["choice"]) is None or \
                    os.path.exists(self._path(row["choice"])):
                continue
            where = row.get("score_shared_with", _row_label(row["method"], row["budget"], row.get("seed")))
            self.put(row["choice"], {key: row[key] for key in ("ruler_average", "ruler", "ruler_samples",
                                                                "perplexity")}
                     | {"scored_as": f"{where} of {path}"}, imported=True)
            added += 1
        return added


def _perplexity(net, rows: torch.Tensor) -> float:
    return math.exp(_loss(net, rows, None, "nll"))


def _ruler(net, tokenizer, lengths, tasks, samples, seed, batch_size) -> Dict:
    from .ruler import evaluate

    # softmax-family mixtures decode against a KV cache; linear candidates recompute the sequence
    config = net.model.generation_config
    use_cache, config.use_cache = config.use_cache, not net.linear_parameters()
    try:
        return evaluate(net.model, tokenizer, lengths, tasks, samples, seed=seed, progress=False,
                        batch_size=batch_size)
    finally:
        config.use_cache = use_cache


# Resuming: an earlier compare.json's rows are kept when every setting matches. When only the evaluation
# settings differ, each row's hybrid (its stored choice) is scored again: no search, no selector. When a
# selection setting differs, every hybrid is selected again (a completed DASH search of the same seed
# resumes from its checkpoint at once; the selectors take seconds) and fine-tuned again.
EVALUATION_SETTINGS = ("lengths", "tasks", "samples", "eval_batch")
# files written before these were recorded
LEGACY_DEFAULTS = {"eval_batch": 1, "finetune_tokens": 0, "seed": 0, "search_init": "uniform", "search_lr": 0.05,
                   "retrieval_fraction": 0.0, "calibration_tokens": 16384, "answer_weight": 1.0,
                   "search_answer_weight": None, "prompts_per_row": 1, "answer_first_weight": 1.0,
                   "retrieval_tasks": None}
# how the refinement runs (files without refine_objective refined by the search's own objective)
LEGACY_REFINE = {"refine_rounds": 0, "refine_objective": None}
# what the search and the selectors learn from: other data, everything is selected again
DATA_SETTINGS = ("retrieval_fraction", "calibration_tokens", "answer_weight", "prompts_per_row", "retrieval_tasks")


def search_settings(answer_weight: Optional[float] = None, answer_first_weight: float = 1.0) -> Dict:
    """Where DASH's search starts, how fast it moves, its objective's answer weight where that is not the
    selectors' (``answer_weight``; None: theirs) and the weight of each prompt's first answer position
    (``answer_first_weight``: the answers_nll / answers_margin searches' and refinements'; the
    selectors do not use it): recorded, so that rows of another search are redone."""
    return {"search_init": SearchConfig.init, "search_lr": SearchConfig.lr, "search_answer_weight": answer_weight,
            "answer_first_weight": answer_first_weight}


RELAXATION_TAGS = {"mixture": "", "straight_through": "_st"}  # of the row names (dash_method)


def dash_method(objective: str, relaxation: str = RELAXATIONS[0]) -> str:
    """The row name of DASH's hybrid searched with ``objective`` and ``relaxation``: ``dash`` for the defaults,
    ``dash_<objective>`` for another objective, then ``_st`` for the straight-through relaxation."""
    return ("dash" if objective == OBJECTIVES[0] else f"dash_{objective}") + RELAXATION_TAGS[relaxation]


BOUNDS = ("teacher", "all_efficient")  # they do not depend on the budget: measured once, at the first budget


def _saved(saved: Dict, key: str):
    return saved.get(key, LEGACY_DEFAULTS.get(key))


def _same_selection(saved: Dict, settings: Dict) -> bool:
    def fine_tuning(s):  # rank and learning rate matter only when there is fine-tuning
        tokens = _saved(s, "finetune_tokens")
        return (tokens, s.get("finetune_rank"), s.get("finetune_lr")) if tokens else (0,)

    # files without "candidates" came from the 4-candidate default: their DASH hybrids are not comparable
    return (_saved(saved, "seed") == settings["seed"] and fine_tuning(saved) == fine_tuning(settings)
            and saved.get("candidates") == settings.get("candidates")
            and all(_saved(saved, key) == _saved(settings, key) for key in DATA_SETTINGS))


def resume_rows(path: str, settings: Dict):
    """(rows to keep as they are, rows to score again from their choice by (method, budget, seed)) of the
    compare.json at ``path``, if any, for a run with ``settings``."""
    if not os.path.exists(path):
        return [], {}
    with open(path) as f:
        saved = json.load(f)
    if not _same_selection(saved, settings):
        return [], {}
    if any(saved.get(key, LEGACY_REFINE[key]) != settings.get(key, LEGACY_REFINE[key]) for key in LEGACY_REFINE):
        # only the refined rows depend on how the refinement ran
        saved["rows"] = [row for row in saved["rows"] if row["method"] != "dash_refined"]
    if any(_saved(saved, key) != _saved(settings, key) for key in search_settings()):
        saved["rows"] = [row for row in saved["rows"] if not row["method"].startswith("dash")]  # searched again
    if all(_saved(saved, key) == settings[key] for key in EVALUATION_SETTINGS):
        return saved["rows"], {}
    return [], {_row_key(row): row for row in saved["rows"]}


def _selector_keys(budget: int, budgets: Sequence[int], methods: Sequence[str],
                   random_seeds: Sequence[int]) -> List[tuple]:
    """The selectors' rows (method, budget, seed) at ``budget``: random once per seed, the bounds only at the
    first budget (they do not depend on it)."""
    return [(method, budget, seed) for method in methods if method not in BOUNDS or budget == budgets[0]
            for seed in (random_seeds if method == "random" else (None,))]


def _run_keys(budgets: Sequence[int], methods: Sequence[str], random_seeds: Sequence[int],
              search_objectives: Sequence[str], refine_rounds: int,
              search_relaxations: Sequence[str] = RELAXATIONS[:1]) -> List[tuple]:
    """The rows (method, budget, seed) that ``compare`` produces with these arguments."""
    keys = []
    for budget in budgets:
        keys += [(dash_method(objective, relaxation), budget, None) for objective in search_objectives
                 for relaxation in search_relaxations]
        if refine_rounds > 0 and OBJECTIVES[0] in search_objectives and RELAXATIONS[0] in search_relaxations:
            keys.append(("dash_refined", budget, None))
        keys += _selector_keys(budget, budgets, methods, random_seeds)
    return keys


def _row_label(method: str, budget: int, seed: Optional[int]) -> str:
    return f"{method} K{budget}" + ("" if seed is None else f" seed {seed}")


def _row_key(row: Dict):
    return row["method"], row["budget"], row["seed"]


def _finetune_folder(tokens: int, rank: int, lr: float, seed: int) -> str:
    """Other fine-tuning settings, another folder (its checkpoint would otherwise resume); the defaults keep
    the name of earlier runs."""
    from .finetune import FinetuneConfig

    name = f"finetune_{tokens}"
    name += "" if rank == FinetuneConfig.rank else f"_rank{rank}"
    name += "" if lr == FinetuneConfig.lr else f"_lr{lr:g}"
    return name + ("" if seed == 0 else f"_seed{seed}")


def comparison_data(tokenizer, seq_len: int, search_tokens: int, retrieval_fraction: float, calibration_tokens: int,
                    seed: int = 0, device: str = "cpu", prompts_per_row: int = 1,
                    retrieval_tasks: Optional[Dict[str, float]] = None) -> Dict:
    """The data of `dash compare`, built as every run of it builds them: ``data`` (the searches' rows, default corpus
    plus retrieval rows of ``prompts_per_row`` prompts each, of the tasks ``retrieval_tasks`` {task: weight} or,
    None, of every task), ``calibration`` (the first ``calibration_tokens`` of its rows, on ``device``: the scoring
    selectors' and the refinement's), ``answers`` (their answer mask, or None) and ``heldout`` (32K tokens of
    held-out rows: the perplexity). Scripts that score hybrids as the comparison does use these same rows."""
    from .data import add_retrieval_rows, default_data

    data = default_data(tokenizer, seq_len, min(search_tokens, 2_000_000), seed=seed, heldout_fraction=0.1)
    data = add_retrieval_rows(data, tokenizer, retrieval_fraction, seed=seed, prompts_per_row=prompts_per_row,
                              tasks=retrieval_tasks)
    rows = torch.arange(min(data.train.shape[0], max(1, calibration_tokens // seq_len)))
    answers = data.answers(rows).to(device) if data.train_answers is not None else None
    return {"data": data, "calibration": data.train[rows].to(device), "answers": answers,
            "heldout": data.heldout[: max(1, 32768 // seq_len)].to(device)}


def comparison_candidates(context: int, efficient: Optional[str] = None) -> List[Candidate]:
    """`dash compare`'s default candidates: full attention and the selectors' efficient operator (``efficient``,
    else the sink + window candidate of ``default_candidates(context)``). DASH then chooses from exactly what the
    selectors choose from, and every hybrid of a budget keeps the same cache; a wider set lets DASH's hybrid buy
    bigger windows with the same count of full layers (in the first GPU table, 2048-token windows in 11 or 12
    layers: 19 to 44 % more cache at 8K than the selectors' hybrids)."""
    if efficient is not None:
        chosen = Candidate.parse(efficient)
        if chosen.is_full:
            raise ValueError(f"efficient must be a window or sink + window operator, got {efficient!r}")
    else:
        pool = default_candidates(context)
        chosen = next((c for c in pool if c.sink), next(c for c in pool if not c.is_full))
    return [Candidate(), chosen]


def kv_cache_mib(config, choices: Sequence[Candidate], context: int) -> float:
    """The hybrid's inference cache at ``context`` tokens (MiB, 16-bit K/V): what a budget buys, so that hybrids
    drawn from different candidates are compared at their real cost."""
    from .supernet import attention_shape

    heads_q, heads_kv, head_dim = attention_shape(config)
    return sum(candidate_cache_bytes(c, context, heads_kv, heads_q, head_dim) for c in choices) / 2 ** 20


def _with_concurrency(cost: Dict) -> Dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(cost, concurrent=int(os.environ.get("DASH_CONCURRENT", "1")),  # processes sharing the machine
                device=device)


def _json(value, depth: int = 0) -> str:
    """Indented JSON whose innermost lists (per-sample scores, choices) take one line each."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_json(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, depth + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value)


def _dump(document: Dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(_json(document) + "\n")


def compare(net, tokenizer, search_data, calibration: torch.Tensor, heldout: torch.Tensor, budgets: Sequence[int],
            efficient: Candidate, *, methods: Sequence[str] = METHODS, random_seeds: Sequence[int] = (0, 1, 2),
            search_tokens: int = 12_300_000, search_batch: int = 2, lengths: Sequence[int] = (1024, 2048, 4096),
            tasks: Optional[Sequence[str]] = None, samples: int = 10, seed: int = 0, output_dir: str = "runs/compare",
            progress: bool = True, finetune_tokens: int = 0, finetune_rank: int = 8,
            finetune_lr: float = 2e-4, eval_batch: int = 1, include_dash: bool = True,
            refine_rounds: int = 2, refine_objective: Optional[str] = None,
            search_objectives: Sequence[str] = OBJECTIVES[:1], search_relaxations: Sequence[str] = RELAXATIONS[:1],
            calibration_answers: Optional[torch.Tensor] = None, answer_weight: float = SearchConfig.answer_weight,
            search_answer_weight: Optional[float] = None, answer_first_weight: float = SearchConfig.answer_first_weight,
            data_settings: Optional[Dict] = None, score_cache: Optional[str] = "",
            import_scores: Sequence[str] = (), import_rows: Sequence[str] = ()) -> Dict:
    """``include_dash=False``: the selectors only (a shard of ``run_sharded``). ``search_objectives``: one DASH
    search per objective (``dash.search``), the default objective's row ``dash``, the others' ``dash_<objective>``;
    ``search_relaxations``: each of them with each relaxation (``dash_method`` names the rows).
    ``refine_rounds > 0`` adds the row ``dash_refined``: the ``dash`` hybrid after that many rounds of
    ``dash.refine`` (swaps of full layers while the search's own objective, or ``refine_objective``, drops on the
    calibration rows).
    ``calibration_answers``: the calibration rows' answer mask (retrieval rows, ``dash.data``): ppl_drop, kl_restore
    and the refinement weight the answer tokens as the ``answers`` objective does (``answer_weight``); the searches
    too, unless ``search_answer_weight`` gives them their own. ``answer_first_weight``: the weight of each prompt's
    first answer position in the answers_nll and answers_margin searches and refinements
    (``dash.search.prompt_answer_weights``; the other objectives and the selectors weigh it as any other).
    ``data_settings``: how the data was made (``DATA_SETTINGS``), recorded so that a rerun on other data selects
    again. ``score_cache``: the folder of ``ScoreCache`` ("": ``output_dir/scores``; None: none); ``import_scores``:
    earlier compare.json files whose hybrids need no second scoring (``ScoreCache.import_rows``); ``import_rows``:
    earlier compare.json files (a committed table) whose rows this run would produce are taken as they are where
    that run's selection settings match (``resume_rows``: scored again from their choice where only the evaluation
    settings differ), so that a new row extends a table without searching or selecting its rows again; their
    hybrids' scores are imported as by ``import_scores``."""
    from .finetune import Finetune, FinetuneConfig
    from .ruler import TASKS

    if finetune_tokens < 0:
        raise ValueError(f"finetune_tokens must be >= 0 (0: no fine-tuning), got {finetune_tokens}")
    unknown = [o for o in search_objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"search_objectives {unknown} unknown; choose from {OBJECTIVES}")
    unknown = [r for r in search_relaxations if r not in RELAXATIONS]
    if unknown:
        raise ValueError(f"search_relaxations {unknown} unknown; choose from {RELAXATIONS}")
    if refine_rounds < 0:
        raise ValueError(f"refine_rounds must be >= 0 (0: no refined DASH row), got {refine_rounds}")
    if refine_objective is not None and refine_objective not in OBJECTIVES:
        raise ValueError(f"refine_objective must be one of {OBJECTIVES} (None: the search's), got {refine_objective!r}")
    refined_by = refine_objective or OBJECTIVES[0]  # dash_refined starts from the default objective's hybrid
    if (include_dash and refine_rounds and OBJECTIVES[0] in search_objectives and refined_by in ANSWER_OBJECTIVES
            and calibration_answers is None):
        raise ValueError(f"refining by the {refined_by} objective needs calibration_answers (the calibration rows' "
                         "answer mask)")
    if not (math.isfinite(answer_first_weight) and answer_first_weight > 0):
        raise ValueError(f"answer_first_weight must be a finite number > 0, got {answer_first_weight}")
    if finetune_tokens:  # bad settings fail now, not after the first search
        FinetuneConfig(tokens=finetune_tokens, batch_size=search_batch, lr=finetune_lr, rank=finetune_rank).validate()
    tasks = list(tasks or TASKS)
    os.makedirs(output_dir, exist_ok=True)
    names = [c.name for c in net.candidates]
    path = os.path.join(output_dir, "compare.json")
    settings = {"lengths": list(lengths), "tasks": tasks, "samples": samples, "seed": seed,
                "eval_batch": eval_batch, "finetune_tokens": finetune_tokens, "finetune_rank": finetune_rank,
                "finetune_lr": finetune_lr, "candidates": names, "refine_rounds": refine_rounds,
                "refine_objective": refine_objective,
                "answer_weight": answer_weight, **(data_settings or {}),
                **search_settings(search_answer_weight, answer_first_weight)}
    context = int(getattr(net.model.config, "max_position_embeddings", 8192))
    rows, earlier = resume_rows(path, settings)
    done = {_row_key(r) for r in rows}
    # fine-tuned hybrids differ by their adapters, not only their layers: scored one by one
    cache = ScoreCache(None if finetune_tokens or score_cache is None else
                       score_cache or os.path.join(output_dir, "scores"), settings, heldout)
    for earlier_file in dict.fromkeys([*import_rows, *import_scores]):
        added = cache.import_rows(earlier_file)
        if progress:
            print(f"[compare] {added} hybrids' scores imported from {earlier_file}", flush=True)
    wanted = set(_run_keys(budgets, methods, random_seeds, search_objectives if include_dash else (), refine_rounds,
                           search_relaxations))
    for earlier_file in import_rows:
        kept, rescore = resume_rows(earlier_file, settings)  # a key is in one of them, never both
        missing = wanted - done
        taken = [row for row in kept if _row_key(row) in missing]
        rows += [dict(row, imported_from=row.get("imported_from", earlier_file)) for row in taken]
        done.update(_row_key(row) for row in taken)
        for key, row in rescore.items():
            if key in missing:
                earlier.setdefault(key, row)
        if progress:
            print(f"[compare] {len(taken)} rows taken from {earlier_file}"
                  + (f", {len(rescore)} of its hybrids to score again" if rescore else ""), flush=True)

    def teacher_hidden(batch):
        with net.teacher():
            return net.model.base_model(batch, use_cache=False).last_hidden_state

    def score(method, budget, run_seed, choices, cost, earlier_row=None):
        indices = [names.index(c.name) for c in choices]
        set_choices(net, indices)
        choice = [c.name for c in choices]
        label = _row_label(method, budget, run_seed)
        shared = cache.get(choice, lambda: _perplexity(net, heldout))
        tuner, tuned = None, None
        if finetune_tokens:  # the same light fine-tuning for every hybrid, resumable like the searches
            tag = f"{method}_K{budget}" + ("" if run_seed is None else f"_seed{run_seed}")
            config = FinetuneConfig(tokens=finetune_tokens, batch_size=search_batch, lr=finetune_lr,
                                    rank=finetune_rank, seed=seed)
            folder = _finetune_folder(finetune_tokens, finetune_rank, finetune_lr, seed)
            tuner = Finetune(net.model, choices, search_data, config, os.path.join(output_dir, folder, tag),
                             teacher_hidden)
        try:
            if tuner is not None:
                summary = tuner.run(progress=progress)
                tuned = {k: summary[k] for k in ("tokens", "seconds", "trained_parameters", "train_kl_first",
                                                 "train_kl_last")}
                tuned.update(rank=finetune_rank, lr=finetune_lr)
            if shared is None:
                started = time.time()
                with net.fixed(indices):  # the same one-hot weights; a decode step computes the chosen candidate only
                    ruler = _ruler(net, tokenizer, lengths, tasks, samples, seed, eval_batch)
                shared = {"ruler_average": ruler["average"], "ruler": ruler["scores"],
                          "ruler_samples": per_sample_scores(ruler["records"]),  # paired comparisons: dash.stats
                          "perplexity": _perplexity(net, heldout), "eval_seconds": time.time() - started,
                          "scored_as": label}
                shared = json.loads(json.dumps(shared))  # as a resumed or shared row reads it (string keys)
                cache.put(choice, shared)
            else:
                shared = dict(shared, score_shared_with=shared["scored_as"])
        finally:
            if tuner is not None:  # the next hybrid starts from the teacher's own weights again
                tuner.remove(merge=False)
        row = {"method": method, "budget": budget, "seed": run_seed, "choice": choice, **shared, "cost": cost,
               "kv_cache_mib": kv_cache_mib(net.model.config, choices, context)}
        row.pop("scored_as")
        if earlier_row is not None:  # its choice and cost (and fine-tuning's) are the earlier run's
            row["reused_choice"] = True
            tuned = earlier_row.get("finetune", tuned)  # a resumed fine-tuning's own seconds would read ~0
        if tuned is not None:
            row["finetune"] = tuned
        rows.append(row)
        _dump({"rows": rows, **settings}, path)  # after every row: a long run keeps results
        if progress:
            print(f"[compare] K={budget} {method}{'' if run_seed is None else f' seed {run_seed}'}"
                  f"{' (earlier choice)' if earlier_row is not None else ''}"
                  f"{' (scores of ' + row['score_shared_with'] + ')' if 'score_shared_with' in row else ''}: "
                  f"RULER {100 * row['ruler_average']:.1f}, ppl {row['perplexity']:.2f}"
                  f"{', scored in %.0f s' % row['eval_seconds'] if row.get('eval_seconds') else ''}"
                  f" ({time.strftime('%H:%M:%S')})", flush=True)

    def score_earlier(key) -> bool:
        """Scores an earlier run's hybrid again, if there is one (only evaluation settings changed)."""
        row = earlier.get(key)
        if row is None or any(name not in names for name in row["choice"]):
            return False
        score(*key, [net.candidates[names.index(name)] for name in row["choice"]], row["cost"], earlier_row=row)
        return True

    for budget in budgets:
        searches = [(o, r) for o in search_objectives for r in search_relaxations] if include_dash else []
        for objective, relaxation in searches:
            method = dash_method(objective, relaxation)
            key, refined_key = (method, budget, None), ("dash_refined", budget, None)
            need_dash = key not in done and not score_earlier(key)
            need_refined = (method == "dash" and refine_rounds > 0 and refined_key not in done
                            and not score_earlier(refined_key))
            if need_dash or need_refined:
                dash_row = None if need_dash else next(r for r in rows if _row_key(r) == key)
                config = SearchConfig(tokens=search_tokens, batch_size=search_batch, budget=budget, seed=seed,
                                      objective=objective, relaxation=relaxation,
                                      answer_weight=answer_weight if search_answer_weight is None else
                                      search_answer_weight,
                                      answer_first_weight=answer_first_weight
                                      if objective in FIRST_WEIGHT_OBJECTIVES else 1.0)
                # another candidate set, objective, relaxation, start, seed or data, another search (a checkpoint
                # resumes only its own; the folders of searches from uniform logits, which lack the start's name,
                # are left alone)
                default = names == [c.name for c in default_candidates(context)]
                folder = f"search_K{budget}_{objective}_{config.init}" + RELAXATION_TAGS[relaxation] + \
                    ("" if default else "_" + "+".join(names)) + ("" if seed == 0 else f"_seed{seed}") + \
                    ("" if search_answer_weight is None else f"_aw{search_answer_weight:g}") + \
                    ("" if config.answer_first_weight == 1.0 else f"_afw{config.answer_first_weight:g}") + \
                    f"_data{search_data.digest()[:8]}"
                if dash_row is None:
                    search = Search(net, search_data, config, os.path.join(output_dir, folder))
                    summary = search.run(progress=progress)  # resumes from its own checkpoint (at once if complete)
                    # the loop's seconds over every run of it (a resumed, finished search takes ~0 s now)
                    search_cost = {"search_tokens": summary["tokens"], "seconds": summary["timing"]["total_search_s"]}
                    from .export import discretise

                    choices = discretise(net.probabilities(), net.candidates, budget)
                else:  # the refinement alone: it starts from the searched hybrid, which the row keeps
                    choices = [net.candidates[names.index(name)] for name in dash_row["choice"]]
                    search_cost = {k: dash_row["cost"][k] for k in ("search_tokens", "seconds")}
                if need_dash:
                    score(method, budget, None, choices, _with_concurrency(search_cost))
                if need_refined:
                    from .refine import refine_full_layers

                    refined = refine_full_layers(net, choices, calibration, refine_rounds, objective=refined_by,
                                                 answers=calibration_answers, answer_weight=answer_weight,
                                                 answer_first_weight=answer_first_weight
                                                 if refined_by in FIRST_WEIGHT_OBJECTIVES else 1.0,
                                                 checkpoint=os.path.join(output_dir, folder, "refine_kl.json" if
                                                                         refined_by == objective else
                                                                         f"refine_kl_{refined_by}.json"),
                                                 progress=progress)
                    cost = dict(search_cost, forward_tokens=refined["cost"]["forward_tokens"],
                                seconds=search_cost["seconds"] + refined["cost"]["seconds"],
                                refine={"rounds": refine_rounds, "objective": refined_by,
                                        "searched_kl": refined["searched_kl"],
                                        "kl": refined["kl"], "swaps": refined["swaps"]})
                    score("dash_refined", budget, None, refined["choices"], _with_concurrency(cost))
        for key in _selector_keys(budget, budgets, methods, random_seeds):
            method, _, run_seed = key
            if key not in done and not score_earlier(key):
                out = select(net, method, budget, efficient, rows=calibration, seed=run_seed or 0,
                             tokenizer=tokenizer, answers=calibration_answers, answer_weight=answer_weight)
                score(method, budget, run_seed, out["choices"], _with_concurrency(out["cost"]))
    return write_tables(rows, budgets, settings, output_dir, finetune_rank)


def write_tables(rows: List[Dict], budgets: Sequence[int], settings: Dict, output_dir: str,
                 finetune_rank: int = 8) -> Dict:
    """compare.json (rows, summary, paired differences, settings), compare.md and compare.png in output_dir."""
    result = summarize(rows, budgets)
    paired = paired_differences(rows, budgets)
    _dump({"rows": rows, "summary": result, "paired": paired, **settings}, os.path.join(output_dir, "compare.json"))
    with open(os.path.join(output_dir, "compare.md"), "w") as f:
        if settings.get("finetune_tokens"):
            f.write(f"Every hybrid fine-tuned on {settings['finetune_tokens']} tokens before scoring (LoRA rank "
                    f"{finetune_rank} on the non-full layers, distilled toward the teacher).\n\n")
        f.write(markdown(result, budgets, paired, noise_note(rows, settings)))
        f.write("\n" + cost_table(rows) + "\n" + task_tables(rows, budgets))
    plot(result, budgets, os.path.join(output_dir, "compare.png"))
    return {"rows": rows, "summary": result, "paired": paired}


def paired_differences(rows: Sequence[Dict], budgets: Sequence[int]) -> Dict[str, Dict[int, Optional[Dict]]]:
    """method -> budget -> DASH's RULER average minus the method's on the same samples, with a 95% paired
    bootstrap interval (``dash.stats.paired_difference``; None where a row keeps no per-sample scores).
    Random's seeds are averaged sample by sample; the bounds' one measurement stands for every budget."""
    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["budget"]), []).append(row)
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dash"))
    out: Dict[str, Dict[int, Optional[Dict]]] = {}
    for budget in budgets:
        if ("dash", budget) not in groups:
            continue
        dash = cell_scores(groups[("dash", budget)])
        for method in methods:
            group = groups.get((method, budget))
            if group is None and method in BOUNDS:
                group = next(g for (m, _), g in groups.items() if m == method)
            if group is not None:
                out.setdefault(method, {})[budget] = paired_difference(dash, cell_scores(group))
    return out


def noise_note(rows: Sequence[Dict], settings: Dict) -> str:
    """How noisy one table cell is: samples per task and length, and the rows' standard errors."""
    counts = sorted({len(scores) for row in rows for by_length in row.get("ruler_samples", {}).values()
                     for scores in by_length.values()})
    if not counts and settings.get("samples"):
        counts = [settings["samples"]]
    if not counts:
        return ""
    n = counts[0]
    text = (f"RULER: {n if len(counts) == 1 else f'{counts[0]}-{counts[-1]}'} samples per task and length. A "
            f"single-answer task's score at one length moves in steps of {100 / n:.0f} points, with a standard "
            f"error of up to {50 / math.sqrt(n):.0f} points")
    errors = [standard_error(cells) for cells in (cell_scores([row]) for row in rows) if cells]
    if errors:
        text += (f"; the standard error of a row's RULER average, from its per-sample scores, is "
                 f"{100 * min(errors):.1f}-{100 * max(errors):.1f} points")
    seeded = len({_row_key(row)[:2] for row in rows}) < len(rows)  # a method measured over several seeds
    return text + (". ± : the spread over random's seeds." if seeded else ".")


def plan_shards(budgets: Sequence[int], methods: Sequence[str], selector_groups: int = 1,
                search_objectives: Sequence[str] = OBJECTIVES[:1],
                search_relaxations: Sequence[str] = RELAXATIONS[:1]) -> List[Dict]:
    """The sharded comparison's work: per budget, a DASH search per objective and relaxation (the longest part;
    ``"dash"`` names the shard's objective, None for a shard without a search, ``"relaxation"`` its relaxation) and
    the selectors, split into
    ``selector_groups`` shards of about equal work (random counts once per seed); then the bounds, measured once,
    in a shard of their own. Longest first, so that the last shards to start are short."""
    if selector_groups < 1:
        raise ValueError(f"selector_groups must be >= 1, got {selector_groups}")
    bounds = [m for m in methods if m in BOUNDS]
    selectors = [m for m in methods if m not in bounds]
    groups: List[List[str]] = [[] for _ in range(min(selector_groups, max(1, len(selectors))))]
    loads = [0] * len(groups)
    for method in sorted(selectors, key=lambda m: -RANDOM_SEEDS_WEIGHT.get(m, 1)):  # heaviest first
        lightest = loads.index(min(loads))
        groups[lightest].append(method)
        loads[lightest] += RANDOM_SEEDS_WEIGHT.get(method, 1)
    shards = [{"name": f"K{k}_{dash_method(objective, relaxation)}", "budget": k, "dash": objective,
               "relaxation": relaxation, "methods": []}
              for objective in search_objectives for relaxation in search_relaxations for k in budgets]
    for k in budgets:
        for i, group in enumerate(g for g in groups if g):
            chosen = [m for m in selectors if m in group]  # the methods' own order
            name = f"K{k}_selectors" + (f"{i + 1}" if len(groups) > 1 else "")
            shards.append({"name": name, "budget": k, "dash": None, "methods": chosen})
    if bounds:
        shards.append({"name": "bounds", "budget": budgets[0], "dash": None, "methods": bounds})
    return shards


RANDOM_SEEDS_WEIGHT = {"random": 3}  # rows a selector adds per budget, where not one (its seeds)


def run_sharded(shard_args: List[str], budgets: Sequence[int], methods: Sequence[str], devices: Sequence[str],
                output_dir: str, settings: Dict, *, poll_s: float = 5.0, progress: bool = True,
                command=None, selector_groups: int = 1, search_objectives: Sequence[str] = OBJECTIVES[:1],
                search_relaxations: Sequence[str] = RELAXATIONS[:1]) -> Dict:
    """Runs plan_shards' shards as ``dash compare`` processes, each on the next free device (a device named
    n times takes n shards at once), each in ``output_dir/shards/<name>`` with its log beside it; then merges
    their rows. Rerunning resumes every shard. ``shard_args``: the parent's arguments that every shard
    repeats (model, candidates, lengths, ...). ``command``: for tests, builds a shard's argv."""
    shards = plan_shards(budgets, methods, selector_groups, search_objectives, search_relaxations)
    folder = os.path.join(output_dir, "shards")
    os.makedirs(folder, exist_ok=True)

    def argv(shard, device):
        if command is not None:
            return command(shard, device)
        local = "cuda" if device.startswith("cuda:") else device  # the process sees its one GPU as cuda
        args = [sys.executable, "-m", "dash", "compare", *shard_args, "--budgets", str(shard["budget"]),
                "--device", local, "--output", os.path.join(folder, shard["name"]),
                "--score-cache", os.path.join(output_dir, "scores")]  # one hybrid, one scoring, across shards
        args += ["--methods", *shard["methods"]] if shard["methods"] else ["--methods"]
        return args + (["--search-objectives", shard["dash"], "--search-relaxations", shard["relaxation"]]
                       if shard["dash"] else ["--skip-dash"])

    queue, free, running, failed, interrupted = list(shards), list(devices), [], [], False
    try:
        while queue or running:
            while queue and free:
                shard, device = queue.pop(0), free.pop(0)
                log = open(os.path.join(folder, shard["name"] + ".log"), "a")
                # the log says what the shard did and when: each row, and progress bars once a minute
                env = dict(os.environ, DASH_CONCURRENT=str(len(devices)), TQDM_MININTERVAL="60")
                if device.startswith("cuda:"):  # one visible GPU a process: Triton launches on the current device
                    env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
                proc = subprocess.Popen(argv(shard, device), stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((shard, device, proc, log, time.time()))
                if progress:
                    print(f"[compare] {shard['name']} started on {device}", flush=True)
            time.sleep(poll_s if running else 0)
            for item in list(running):
                shard, device, proc, log, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                free.append(device)
                if proc.returncode != 0:
                    failed.append(shard["name"])
                if progress:
                    state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see its log)"
                    print(f"[compare] {shard['name']} {state} after {time.time() - started:.0f} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C, `timeout -s INT`: stop the shards (each resumes from its checkpoints)
        interrupted = True
    finally:
        for _, _, proc, log, _ in running:
            proc.terminate()
            proc.wait()
            log.close()
    folders = [os.path.join(folder, s["name"]) for s in shards]
    rows = merge_shard_rows(folders, {key: settings.get(key, value) for key, value in search_settings().items()})
    settings = dict(settings, **resolved_evaluation(folders), devices=list(devices))
    result = write_tables(rows, budgets, settings, output_dir, settings.get("finetune_rank", 8))  # what is done so far
    if interrupted:
        raise SystemExit(f"interrupted with {len(rows)} rows measured; rerun the same command to resume")
    if failed:
        raise RuntimeError(f"shards {failed} failed (logs in {folder}); rerun the same command to resume them")
    return result


def resolved_evaluation(folders: Sequence[str]) -> Dict:
    """The evaluation settings and the candidates as the shards resolved them (lengths by the model's context, the
    evaluation batch by the device, the candidates by the context), from the first shard's compare.json: the
    parent's own may be None (``ScoreCache`` needs them; ``resume_rows`` needs the candidates of a table that a
    later run imports)."""
    for shard_folder in folders:
        path = os.path.join(shard_folder, "compare.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            return {key: saved[key] for key in (*EVALUATION_SETTINGS, "candidates") if saved.get(key) is not None}
    return {}


def merge_shard_rows(folders: Sequence[str], current: Optional[Dict] = None) -> List[Dict]:
    """The rows of every shard folder's compare.json that exists (one row per method, budget, seed); DASH rows
    of a search that started or moved otherwise than this run's search (``current``, ``search_settings``' keys;
    default this version's with the selectors' answer weight) are left out (stale until their shard runs
    again)."""
    current = current or search_settings()
    rows, seen = [], set()
    for shard_folder in folders:
        path = os.path.join(shard_folder, "compare.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            saved = json.load(f)
        stale = any(_saved(saved, key) != _saved(current, key) for key in search_settings())
        for row in saved["rows"]:
            if stale and row["method"].startswith("dash"):
                continue
            key = (row["method"], row["budget"], row["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def summarize(rows: Sequence[Dict], budgets: Sequence[int]) -> Dict:
    """method -> budget -> {"ruler": mean, "ruler_std": spread over seeds, "perplexity": mean}."""
    out: Dict[str, Dict] = {}
    for row in rows:
        out.setdefault(row["method"], {}).setdefault(row["budget"], []).append(row)
    summary = {}
    for method, by_budget in out.items():
        summary[method] = {}
        for budget, group in by_budget.items():
            scores = [r["ruler_average"] for r in group]
            kv = [r["kv_cache_mib"] for r in group if r.get("kv_cache_mib") is not None]
            summary[method][budget] = {"ruler": mean(scores), "ruler_std": pstdev(scores) if len(scores) > 1 else 0.0,
                                       "perplexity": mean(r["perplexity"] for r in group), "runs": len(group),
                                       "kv_cache_mib": mean(kv) if len(kv) == len(group) else None}
    return summary


def markdown(summary: Dict, budgets: Sequence[int], paired: Optional[Dict] = None, note: str = "") -> str:
    """The main table (RULER, perplexity), the note under it, then DASH minus each method with its interval."""
    lines = ["| method | " + " | ".join(f"K={k} RULER | K={k} ppl | K={k} KV MiB" for k in budgets) + " |",
             "| --- |" + " --- | --- | --- |" * len(budgets)]
    for method, by_budget in summary.items():
        cells = []
        for k in budgets:
            entry = by_budget.get(k)
            if entry is None and method in BOUNDS:  # measured once, for all budgets
                entry = next(iter(by_budget.values()))
            if entry is None:
                cells.append("not measured | | ")
                continue
            spread = f" ± {100 * entry['ruler_std']:.1f}" if entry["runs"] > 1 else ""
            kv = entry.get("kv_cache_mib")
            cells.append(f"{100 * entry['ruler']:.1f}{spread} | {entry['perplexity']:.2f} | "
                         + ("—" if kv is None else f"{kv:.1f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    if paired:
        lines += ["", "DASH minus each method (RULER points, 95% paired bootstrap CI over the samples of each task "
                  "and length; * : the CI excludes 0; — : no per-sample scores in these rows)", "",
                  "| method | " + " | ".join(f"K={k}" for k in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for method, by_budget in paired.items():
            cells = []
            for k in budgets:
                if k not in by_budget:  # not measured at this budget (or no DASH row)
                    cells.append("")
                elif by_budget[k] is None:
                    cells.append("—")
                else:
                    d = by_budget[k]
                    mark = " *" if d["excludes_zero"] else ""
                    cells.append(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_table(rows: Sequence[Dict]) -> str:
    """What choosing each method's hybrid cost: tokens through the model (DASH: its search's training tokens;
    selectors: calibration forward and backward passes), wall minutes per budget (mean; in a sharded run, of
    a process that shared the machine with ``concurrent`` others) and the device."""
    by_method: Dict[str, List[Dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row.get("cost") or {})
    lines = ["Selection cost per hybrid (tokens through the model, wall minutes, device; mean over budgets and "
             "seeds)", "", "| method | tokens | minutes | device | processes sharing it |", "| --- | --- | --- | --- | --- |"]
    for method, costs in by_method.items():
        tokens = mean(sum(c.get(k, 0) for k in ("search_tokens", "forward_tokens", "backward_tokens"))
                      for c in costs)
        seconds = [c.get("seconds", 0.0) for c in costs]  # None: not recorded (the rows say why)
        minutes = "not recorded" if None in seconds else f"{mean(seconds) / 60:.2f}"
        devices = sorted({str(c["device"]) for c in costs if "device" in c}) or ["—"]
        shared = sorted({c["concurrent"] for c in costs if "concurrent" in c})
        lines.append(f"| {method} | {tokens / 1e6:.2f}M | {minutes} | {', '.join(devices)} | "
                     f"{', '.join(map(str, shared)) or '—'} |")
    return "\n".join(lines) + "\n"


def task_tables(rows: Sequence[Dict], budgets: Sequence[int]) -> str:
    """Per budget: every method's score on each RULER task (mean over lengths and, for random, seeds)."""
    tasks = list(dict.fromkeys(t for row in rows for t in row.get("ruler", {})))
    if not tasks:
        return ""
    out = []
    for budget in budgets:
        group: Dict[str, List[Dict]] = {}
        for row in rows:
            if row["budget"] == budget or row["method"] in BOUNDS:
                group.setdefault(row["method"], []).append(row)
        lines = [f"RULER per task at K={budget} (mean over lengths)", "",
                 "| method | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
        for method, members in group.items():
            cells = []
            for task in tasks:
                values = [v for r in members for v in r.get("ruler", {}).get(task, {}).values()]
                cells.append(f"{100 * mean(values):.0f}" if values else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def plot(summary: Dict, budgets: Sequence[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_budget in summary.items():
        ys = [(by_budget.get(k) or next(iter(by_budget.values())))["ruler"] * 100 for k in budgets]
        ax.plot(budgets, ys, marker="o", label=method, linewidth=2.5 if method == "dash" else 1.2)
    ax.set_xlabel("full-attention layers (K)")
    ax.set_ylabel("RULER-style average")
    if summary:  # an interrupted sharded run may have no rows yet
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
