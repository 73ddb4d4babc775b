"""DASH against the selector baselines at several budgets: one command, one table.

For every budget K (full-attention layers): a DASH search (its own budget regulariser, the same search-token
budget for all K), then every selector of ``dash.baselines`` (random over several seeds), each hybrid scored by
RULER-style tasks and held-out perplexity on the same samples. Every hybrid is evaluated in place through the
supernet with one-hot logits, which computes exactly what its exported model computes (the export path turns
the same choices into the model directory). Writes ``compare.json``, ``compare.md`` and ``compare.png``.

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
from .candidates import Candidate


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


def compare(net, tokenizer, search_data, calibration: torch.Tensor, heldout: torch.Tensor, budgets: Sequence[int],
            efficient: Candidate, *, methods: Sequence[str] = METHODS, random_seeds: Sequence[int] = (0, 1, 2),
            search_tokens: int = 12_300_000, search_batch: int = 2, lengths: Sequence[int] = (1024, 2048, 4096),
            tasks: Optional[Sequence[str]] = None, samples: int = 10, seed: int = 0, output_dir: str = "runs/compare",
            progress: bool = True, finetune_tokens: int = 0, finetune_rank: int = 8,
            finetune_lr: float = 2e-4, eval_batch: int = 1, include_dash: bool = True) -> Dict:
    """``include_dash=False``: the selectors only (a shard of ``run_sharded``)."""
    from .finetune import Finetune, FinetuneConfig
    from .ruler import TASKS
    from .search import Search, SearchConfig

    if finetune_tokens < 0:
        raise ValueError(f"finetune_tokens must be >= 0 (0: no fine-tuning), got {finetune_tokens}")
    if finetune_tokens:  # bad settings fail now, not after the first search
        FinetuneConfig(tokens=finetune_tokens, batch_size=search_batch, lr=finetune_lr, rank=finetune_rank).validate()
    tasks = list(tasks or TASKS)
    os.makedirs(output_dir, exist_ok=True)
    names = [c.name for c in net.candidates]
    rows: List[Dict] = []
    path = os.path.join(output_dir, "compare.json")
    if os.path.exists(path):  # resume: rows already measured (same settings) are kept, not recomputed
        with open(path) as f:
            saved = json.load(f)
        same = (saved.get("lengths") == list(lengths) and saved.get("tasks") == tasks
                and saved.get("finetune_tokens", 0) == finetune_tokens
                and saved.get("eval_batch", 1) == eval_batch)
        if same:
            rows = saved["rows"]
    done = {(r["method"], r["budget"], r["seed"]) for r in rows}
    settings = {"lengths": list(lengths), "tasks": tasks, "finetune_tokens": finetune_tokens,
                "eval_batch": eval_batch}

    def teacher_hidden(batch):
        with net.teacher():
            return net.model.base_model(batch, use_cache=False).last_hidden_state

    def score(method, budget, run_seed, choices, cost):
        set_choices(net, [names.index(c.name) for c in choices])
        tuner, tuned = None, None
        if finetune_tokens:  # the same light fine-tuning for every hybrid, resumable like the searches
            tag = f"{method}_K{budget}" + ("" if run_seed is None else f"_seed{run_seed}")
            config = FinetuneConfig(tokens=finetune_tokens, batch_size=search_batch, lr=finetune_lr,
                                    rank=finetune_rank, seed=seed)
            tuner = Finetune(net.model, choices, search_data, config,
                             os.path.join(output_dir, f"finetune_{finetune_tokens}", tag), teacher_hidden)
        try:
            if tuner is not None:
                summary = tuner.run(progress=progress)
                tuned = {k: summary[k] for k in ("tokens", "seconds", "trained_parameters", "train_kl_first",
                                                 "train_kl_last")}
                tuned.update(rank=finetune_rank, lr=finetune_lr)
            ruler = _ruler(net, tokenizer, lengths, tasks, samples, seed, eval_batch)
            perplexity = _perplexity(net, heldout)
        finally:
            if tuner is not None:  # the next hybrid starts from the teacher's own weights again
                tuner.remove(merge=False)
        cost = dict(cost, concurrent=int(os.environ.get("DASH_CONCURRENT", "1")))  # processes sharing the machine
        row = {"method": method, "budget": budget, "seed": run_seed, "choice": [c.name for c in choices],
               "ruler_average": ruler["average"], "ruler": ruler["scores"], "perplexity": perplexity, "cost": cost}
        if tuned is not None:
            row["finetune"] = tuned
        rows.append(row)
        with open(os.path.join(output_dir, "compare.json"), "w") as f:  # after every row: a long run keeps results
            json.dump({"rows": rows, **settings}, f, indent=1)
        if progress:
            print(f"[compare] K={budget} {method}{'' if run_seed is None else f' seed {run_seed}'}: "
                  f"RULER {100 * row['ruler_average']:.1f}, ppl {row['perplexity']:.2f}", flush=True)

    for budget in budgets:
        started = time.time()
        for state in net.states:  # every search starts from uniform logits
            with torch.no_grad():
                state.alpha.zero_()
        if include_dash and ("dash", budget, None) not in done:
            config = SearchConfig(tokens=search_tokens, batch_size=search_batch, budget=budget, seed=seed)
            search = Search(net, search_data, config, os.path.join(output_dir, f"search_K{budget}"))
            summary = search.run(progress=progress)  # resumes from its own checkpoint
            from .export import discretise

            choices = discretise(net.probabilities(), net.candidates, budget)
            score("dash", budget, None, choices, {"search_tokens": summary["tokens"],
                                                   "seconds": time.time() - started})
        for method in methods:
            for run_seed in (random_seeds if method == "random" else (None,)):
                if method in ("teacher", "all_efficient") and budget != budgets[0]:
                    continue  # the bounds do not depend on the budget
                if (method, budget, run_seed) in done:
                    continue
                out = select(net, method, budget, efficient, rows=calibration, seed=run_seed or 0,
                             tokenizer=tokenizer)
                score(method, budget, run_seed, out["choices"], out["cost"])
    return write_tables(rows, budgets, settings, output_dir, finetune_rank)


def write_tables(rows: List[Dict], budgets: Sequence[int], settings: Dict, output_dir: str,
                 finetune_rank: int = 8) -> Dict:
    """compare.json (rows, summary, settings), compare.md and compare.png in output_dir."""
    result = summarize(rows, budgets)
    with open(os.path.join(output_dir, "compare.json"), "w") as f:
        json.dump({"rows": rows, "summary": result, **settings}, f, indent=1)
    with open(os.path.join(output_dir, "compare.md"), "w") as f:
        if settings.get("finetune_tokens"):
            f.write(f"Every hybrid fine-tuned on {settings['finetune_tokens']} tokens before scoring (LoRA rank "
                    f"{finetune_rank} on the non-full layers, distilled toward the teacher).\n\n")
        f.write(markdown(result, budgets))
    plot(result, budgets, os.path.join(output_dir, "compare.png"))
    return {"rows": rows, "summary": result}


def plan_shards(budgets: Sequence[int], methods: Sequence[str]) -> List[Dict]:
    """The sharded comparison's work: per budget, the DASH search (the longest part) and the selectors; the
    bounds go with the first budget's selectors. Longest first, so that the last shards to start are short."""
    bounds = [m for m in methods if m in ("teacher", "all_efficient")]
    selectors = [m for m in methods if m not in bounds]
    shards = [{"name": f"K{k}_dash", "budget": k, "dash": True, "methods": []} for k in budgets]
    for i, k in enumerate(budgets):
        chosen = selectors + (bounds if i == 0 else [])
        if chosen:
            shards.append({"name": f"K{k}_selectors", "budget": k, "dash": False, "methods": chosen})
    return shards


def run_sharded(shard_args: List[str], budgets: Sequence[int], methods: Sequence[str], devices: Sequence[str],
                output_dir: str, settings: Dict, *, poll_s: float = 5.0, progress: bool = True,
                command=None) -> Dict:
    """Runs plan_shards' shards as ``dash compare`` processes, each on the next free device (a device named
    n times takes n shards at once), each in ``output_dir/shards/<name>`` with its log beside it; then merges
    their rows. Rerunning resumes every shard. ``shard_args``: the parent's arguments that every shard
    repeats (model, candidates, lengths, ...). ``command``: for tests, builds a shard's argv."""
    shards = plan_shards(budgets, methods)
    folder = os.path.join(output_dir, "shards")
    os.makedirs(folder, exist_ok=True)

    def argv(shard, device):
        if command is not None:
            return command(shard, device)
        local = "cuda" if device.startswith("cuda:") else device  # the process sees its one GPU as cuda
        args = [sys.executable, "-m", "dash", "compare", *shard_args, "--budgets", str(shard["budget"]),
                "--device", local, "--output", os.path.join(folder, shard["name"]), "--no-progress"]
        args += ["--methods", *shard["methods"]] if shard["methods"] else ["--methods"]
        return args + ([] if shard["dash"] else ["--skip-dash"])

    queue, free, running, failed, interrupted = list(shards), list(devices), [], [], False
    try:
        while queue or running:
            while queue and free:
                shard, device = queue.pop(0), free.pop(0)
                log = open(os.path.join(folder, shard["name"] + ".log"), "a")
                env = dict(os.environ, DASH_CONCURRENT=str(len(devices)))
                if device.startswith("cuda:"):  # one visible GPU a process: Triton launches on the current device
                    env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
                proc = subprocess.Popen(argv(shard, device), stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((shard, device, proc, log))
                if progress:
                    print(f"[compare] {shard['name']} started on {device}", flush=True)
            time.sleep(poll_s if running else 0)
            for item in list(running):
                shard, device, proc, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                free.append(device)
                if proc.returncode != 0:
                    failed.append(shard["name"])
                if progress:
                    state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see its log)"
                    print(f"[compare] {shard['name']} {state}", flush=True)
    except KeyboardInterrupt:  # Ctrl-C, `timeout -s INT`: stop the shards (each resumes from its checkpoints)
        interrupted = True
    finally:
        for _, _, proc, log in running:
            proc.terminate()
            proc.wait()
            log.close()
    rows = merge_shard_rows([os.path.join(folder, s["name"]) for s in shards])
    result = write_tables(rows, budgets, dict(settings, devices=list(devices)), output_dir,
                          settings.get("finetune_rank", 8))  # what is done so far
    if interrupted:
        raise SystemExit(f"interrupted with {len(rows)} rows measured; rerun the same command to resume")
    if failed:
        raise RuntimeError(f"shards {failed} failed (logs in {folder}); rerun the same command to resume them")
    return result


def merge_shard_rows(folders: Sequence[str]) -> List[Dict]:
    """The rows of every shard folder's compare.json that exists (one row per method, budget, seed)."""
    rows, seen = [], set()
    for shard_folder in folders:
        path = os.path.join(shard_folder, "compare.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for row in json.load(f)["rows"]:
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
            summary[method][budget] = {"ruler": mean(scores), "ruler_std": pstdev(scores) if len(scores) > 1 else 0.0,
                                       "perplexity": mean(r["perplexity"] for r in group), "runs": len(group)}
    return summary


def markdown(summary: Dict, budgets: Sequence[int]) -> str:
    lines = ["| method | " + " | ".join(f"K={k} RULER | K={k} ppl" for k in budgets) + " |",
             "| --- |" + " --- | --- |" * len(budgets)]
    for method, by_budget in summary.items():
        cells = []
        for k in budgets:
            entry = by_budget.get(k) or next(iter(by_budget.values()))  # bounds: one entry for all budgets
            spread = f" ± {100 * entry['ruler_std']:.1f}" if entry["runs"] > 1 else ""
            cells.append(f"{100 * entry['ruler']:.1f}{spread} | {entry['perplexity']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
