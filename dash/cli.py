"""``dash`` command line: ``dash align`` (stage 1), ``dash search`` (stage 2), ``dash export`` (discretise
and write a hybrid), ``dash finetune`` (light distillation of an exported hybrid), ``dash eval`` (perplexity,
RULER-style tasks) and ``dash compare`` (DASH against the selector baselines), on the embedded SmolLM2 or any model.

Settings come from defaults, then a YAML file (``--config``), then command-line flags; the resolved
settings are written to ``<output>/config.yaml``. Re-running the same command resumes a killed search.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

import torch

from .search import INITS, OBJECTIVES, RELAXATIONS, SearchConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_TOKENS = 16_384  # a smoke-sized search that finishes in minutes on a laptop CPU
RETRIEVAL_FRACTION = 0.5  # default share of retrieval rows in the search's (and the selectors') data
PROMPTS_PER_ROW = 1  # default retrieval prompts in a retrieval row (dash.data.retrieval_rows)
SOLVED_SAMPLES = 8  # --retrieval-tasks solved: the teacher's greedy answers per task


def _search_parser(sub):
    p = sub.add_parser("search", help="stage 2: learn per-layer architecture logits (weights frozen)")
    p.add_argument("--config", help="YAML file with any of the settings below")
    p.add_argument("--model", help="'smollm2-135m-instruct' (default, embedded), a .gguf, a directory or a hub id")
    p.add_argument("--data", nargs="+", help="text/jsonl files, folders or hf:<dataset>[:split] (default: offline "
                                            "corpus)")
    p.add_argument("--candidates", nargs="+", help="e.g. full swa512 swa2048 sink64_swa512 (default: by context)")
    p.add_argument("--per-kv-group", action="store_true", default=None, help="one mixture per KV-head group")
    p.add_argument("--seq-len", type=int, help="packed sequence length (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--tokens", type=int, help="search tokens (default 12.3M on GPU, 16K on CPU)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--budget", type=float, help="full-attention layers (or bytes with --budget-kind kv_bytes)")
    p.add_argument("--budget-kind", choices=["full_layers", "kv_bytes"])
    p.add_argument("--budget-context", type=int)
    p.add_argument("--output", help="output directory (default: runs/search)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="model dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--bank", help="linear-candidate bank from `dash align` (needed with 'gla' or 'gdn' candidates)")
    p.add_argument("--compile-modules", action="store_true", default=None,
                   help="torch.compile the norms and MLPs (the stateless modules): fewer kernel launches a step")
    p.add_argument("--objective", choices=list(OBJECTIVES), help="token weighting of the search's KL (default "
                   "answers: the mean plus --answer-weight times the mean over the retrieval rows' answer tokens; "
                   "uniform: the plain mean; long_range: each token's KL times the all-efficient model's KL to the "
                   "teacher there; answers_nll: the mean plus --answer-weight times the answers' NLL, averaged per prompt; "
                   "answers_margin: the same with the shortfall of the hybrid's greedy margin from the teacher's "
                   "instead of the NLL; see dash.search)")
    p.add_argument("--answer-weight", type=float, help="objectives answers / answers_nll / answers_margin: weight "
                   "of the answer tokens' mean KL / NLL / margin shortfall "
                   f"(default {SearchConfig.answer_weight})")
    p.add_argument("--answer-first-weight", type=float, help="objectives answers_nll / answers_margin: each "
                   "prompt's first answer token weighs this many of its others, the prompt's total unchanged "
                   f"(dash.search.prompt_answer_weights; default {SearchConfig.answer_first_weight}: evenly; > 0)")
    p.add_argument("--retrieval-fraction", type=float, help="share of the training rows that are RULER-style "
                   f"retrieval prompts with their answers (dash.data.add_retrieval_rows; default {RETRIEVAL_FRACTION}; "
                   "0: the text alone, for objectives other than answers and answers_nll)")
    p.add_argument("--prompts-per-row", type=int, help="retrieval prompts in each retrieval row, each in a slot "
                   f"of seq_len / n tokens (dash.data.retrieval_rows; default {PROMPTS_PER_ROW}: one a row)")
    p.add_argument("--retrieval-tasks", nargs="+", metavar="TASK[:WEIGHT]", help="the RULER-style tasks of the "
                   "retrieval rows, each with its share of the prompts (default: every task, in turn); 'solved': "
                   "the tasks the teacher answers on training prompts, weighted by its score on them "
                   f"({SOLVED_SAMPLES} greedy answers each; dash.ruler.teacher_task_weights)")
    p.add_argument("--init", choices=list(INITS), help="where the logits start (default budget: every layer at "
                   "the budget's mix of candidates, e.g. p(full) = K / L; uniform: equal logits)")
    p.add_argument("--relaxation", choices=list(RELAXATIONS), help="what a step's forward computes (default "
                   "mixture: each layer the probability-weighted sum of its candidates; straight_through: a discrete "
                   "hybrid drawn as the export makes one, the gradient through the probabilities; see dash.search)")
    p.add_argument("--no-export", action="store_true", help="skip exporting the hybrid at the end")
    p.add_argument("--no-progress", action="store_true")
    return p


def _align_parser(sub):
    p = sub.add_parser("align", help="stage 1: align every layer's linear candidate to its teacher attention")
    p.add_argument("--model", help="as for `dash search`")
    p.add_argument("--data", nargs="+", help="text/jsonl files or folders (default: offline corpus)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--kinds", nargs="+", default=["gla", "gdn"], choices=["gla", "gdn"],
                   help="linear candidates to align (default: both, gated linear attention and gated delta rule)")
    p.add_argument("--tokens", type=int, default=None, help="alignment tokens (default 2M on GPU, 16K on CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--output", default=os.path.join("runs", "align"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run_align(args) -> dict:
    from .align import Align, AlignConfig
    from .data import default_data, pack, read_documents
    from .models import load_model
    from .supernet import build_supernet

    on_gpu = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    seq_len = args.seq_len or (2048 if on_gpu else 1024)
    tokens = args.tokens or (2_000_000 if on_gpu else CPU_DEFAULT_TOKENS)
    model_name = args.model or "smollm2-135m-instruct"
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    if args.data:
        data = pack(read_documents(args.data), tokenizer, seq_len, seed=args.seed)
    else:
        data = default_data(tokenizer, seq_len, min(tokens, 2_000_000), seed=args.seed)
    net = build_supernet(model, ["full", *args.kinds])
    config = AlignConfig(tokens=tokens, batch_size=args.batch_size or (4 if on_gpu else 1), lr=args.lr,
                         seed=args.seed)
    return Align(net, data, config, args.output, model_name=model_name).run(progress=not args.no_progress)


def resolve_search_settings(args) -> dict:
    settings = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.config}: expected a mapping of settings")
        settings.update(loaded)
    for key, value in vars(args).items():
        if key not in ("config", "command", "no_progress", "no_export") and value is not None:
            settings[key] = value
    device = settings.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    settings.setdefault("model", "smollm2-135m-instruct")
    settings.setdefault("dtype", "bfloat16" if on_gpu else "float32")
    settings.setdefault("seq_len", 4096 if on_gpu else 1024)  # longer than the widest default window
    settings.setdefault("tokens", SearchConfig.tokens if on_gpu else CPU_DEFAULT_TOKENS)
    settings.setdefault("batch_size", 2 if on_gpu else 1)
    settings.setdefault("output", os.path.join("runs", "search"))
    settings.setdefault("seed", 0)
    settings.setdefault("retrieval_fraction", RETRIEVAL_FRACTION)
    settings.setdefault("prompts_per_row", PROMPTS_PER_ROW)
    known = {f.name for f in fields(SearchConfig)} | {"model", "data", "candidates", "per_kv_group", "seq_len",
                                                       "output", "device", "dtype", "bank", "retrieval_fraction",
                                                       "prompts_per_row", "retrieval_tasks"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {sorted(known)}")
    if settings["dtype"] not in DTYPES:
        raise SystemExit(f"dtype must be one of {list(DTYPES)}, got {settings['dtype']!r}")
    tasks = settings.get("retrieval_tasks")
    if tasks is not None:  # checked before the model loads
        from .data import parse_retrieval_tasks

        settings["retrieval_tasks"] = tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
        if tasks != ["solved"]:
            try:
                parse_retrieval_tasks(tasks, name="--retrieval-tasks")
            except ValueError as error:
                raise SystemExit(str(error)) from None
    return settings


def _load_bank_if_needed(net, settings: dict) -> None:
    from .align import load_bank

    if settings.get("bank"):
        load_bank(net, settings["bank"], model_name=settings["model"])
    elif net.linear_parameters():
        raise SystemExit("linear candidates ('gla', 'gdn') need an aligned bank: run `dash align`, then pass "
                         "--bank <dir>")


def retrieval_task_weights(specs, model, tokenizer, seq_len: int, prompts_per_row: int, fraction: float,
                           seed: int, progress: bool = True):
    """``--retrieval-tasks`` as ``dash.data.retrieval_rows`` takes it: None (every task), {task: weight}, or for
    ``solved`` the teacher's scores on training prompts as long as the rows' middle prompt (half a slot), printed
    (``model`` is used only for ``solved``, and not where there are no retrieval rows)."""
    from .data import format_retrieval_tasks, parse_retrieval_tasks
    from .ruler import teacher_task_weights

    if specs is None:
        return None
    specs = [specs] if isinstance(specs, str) else list(specs)
    if "solved" not in specs:
        try:
            return parse_retrieval_tasks(specs, name="--retrieval-tasks")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if len(specs) != 1:
        raise SystemExit(f"--retrieval-tasks: 'solved' stands alone, got {specs}")
    if fraction == 0:
        return None
    length = max(128, seq_len // prompts_per_row // 2)
    on_gpu = next(model.parameters()).device.type == "cuda"
    try:
        weights = teacher_task_weights(model, tokenizer, length, SOLVED_SAMPLES, seed=seed, progress=progress,
                                       batch_size=SOLVED_SAMPLES if on_gpu else 1)
    except ValueError as error:
        raise SystemExit(f"--retrieval-tasks solved: {error}") from None
    print(f"--retrieval-tasks solved: {' '.join(format_retrieval_tasks(weights))}", file=sys.stderr)
    return weights


def run_search(settings: dict, progress: bool = True) -> dict:
    import yaml

    from .data import add_retrieval_rows, default_data, pack, read_documents
    from .models import load_model
    from .search import Search
    from .supernet import build_supernet

    os.makedirs(settings["output"], exist_ok=True)
    with open(os.path.join(settings["output"], "config.yaml"), "w") as f:
        yaml.safe_dump(settings, f, sort_keys=True)
    started = time.perf_counter()
    model, tokenizer = load_model(settings["model"], device=settings["device"], dtype=DTYPES[settings["dtype"]])
    load_s = time.perf_counter() - started
    seq_len, tokens, seed = settings["seq_len"], settings["tokens"], settings["seed"]
    started = time.perf_counter()
    if settings.get("data"):
        data = pack(read_documents(settings["data"]), tokenizer, seq_len, seed=seed)
    else:
        data = default_data(tokenizer, seq_len, min(tokens, 2_000_000), seed=seed)
    task_weights = retrieval_task_weights(settings.get("retrieval_tasks"), model, tokenizer, seq_len,
                                          settings["prompts_per_row"], settings["retrieval_fraction"], seed,
                                          progress=progress)
    if settings.get("retrieval_tasks") == ["solved"]:
        with open(os.path.join(settings["output"], "config.yaml"), "w") as f:  # the weights the data were made with
            yaml.safe_dump({**settings, "retrieval_task_weights": task_weights}, f, sort_keys=True)
    data = add_retrieval_rows(data, tokenizer, settings["retrieval_fraction"], seed=seed, tasks=task_weights,
                              prompts_per_row=settings["prompts_per_row"])
    data_s = time.perf_counter() - started
    net = build_supernet(model, settings.get("candidates"), per_kv_group=bool(settings.get("per_kv_group")))
    _load_bank_if_needed(net, settings)
    same_as_full = [c.name for c in net.candidates if c.window is not None and c.window >= seq_len]
    if same_as_full:
        print(f"warning: {same_as_full} cover every position of a {seq_len}-token sequence, so the search cannot "
              "tell them from full attention; use a longer --seq-len", file=sys.stderr)
    search_fields = {f.name for f in fields(SearchConfig)}
    config = SearchConfig(**{k: v for k, v in settings.items() if k in search_fields})
    summary = Search(net, data, config, settings["output"]).run(progress=progress)
    summary["candidates"] = [c.name for c in net.candidates]
    summary["timing"] = {"load_s": load_s, "data_s": data_s, **summary["timing"]}
    with open(os.path.join(settings["output"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _export_parser(sub):
    p = sub.add_parser("export", help="discretise a search under a budget and write a loadable hybrid")
    p.add_argument("--search", required=True, help="output directory of `dash search`")
    p.add_argument("--budget", type=float, help="full-attention layers (default: the search's budget)")
    p.add_argument("--budget-kind", choices=["full_layers", "kv_bytes"])
    p.add_argument("--budget-context", type=int)
    p.add_argument("--output", help="hybrid directory (default: <search>/hybrid)")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="perplexity and RULER-style long-context scores of a model or exported hybrid")
    p.add_argument("--model", help="an exported hybrid directory, or any model `dash search --model` accepts")
    p.add_argument("--data", nargs="+", help="text/jsonl files or folders (default: offline synthetic corpus)")
    p.add_argument("--suite", choices=["perplexity", "ruler", "all"], default="perplexity",
                   help="perplexity on held-out text, RULER-style long-context tasks (offline), or both")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens to score")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="RULER prompt lengths in tokens (each must fit the model's context)")
    p.add_argument("--tasks", nargs="+", default=None, help="RULER tasks (default: all)")
    p.add_argument("--samples", type=int, default=10, help="RULER samples per task and length")
    p.add_argument("--batch-size", type=int, default=None,
                   help="RULER prompts generated together (default on a GPU: all the samples of a task and length, "
                   "one generate call each; 1 on the CPU; shorter prompts are left-filled)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSON file for the result")


def run_export(args) -> dict:
    import yaml

    from .export import discretise, export_hybrid
    from .models import load_model
    from .report import write_report
    from .search import SearchConfig, layer_costs
    from .supernet import build_supernet

    with open(os.path.join(args.search, "config.yaml")) as f:
        settings = yaml.safe_load(f)
    from .search import load_checkpoint

    state = load_checkpoint(os.path.join(args.search, "search_state.pt"),
                            ("step", "alphas", "history", "config", "candidates"))
    cfg = SearchConfig(**state["config"])
    budget_kind = args.budget_kind or cfg.budget_kind
    budget = args.budget if args.budget is not None else cfg.budget
    if args.budget_context:
        cfg.budget_context = args.budget_context
    cfg.budget_kind = budget_kind
    model, tokenizer = load_model(settings["model"], device="cpu", dtype=DTYPES[settings["dtype"]])
    net = build_supernet(model, state["candidates"], per_kv_group=bool(settings.get("per_kv_group")))
    _load_bank_if_needed(net, settings)
    with torch.no_grad():
        for alpha, saved in zip(net.arch_parameters(), state["alphas"]):
            alpha.copy_(saved)
    history = state["history"]
    net.set_temperature(history[-1]["tau"] if history else 1.0)
    probs = net.probabilities()
    choices = discretise(probs, net.candidates, budget, budget_kind, layer_costs(net, cfg))
    linear_modules = [s.linear for s in net.states]
    model.set_attn_implementation("sdpa")
    for layer in net.layers:
        del layer.dash
    output = args.output or os.path.join(args.search, "hybrid")
    report = {"model": settings["model"], "budget": budget, "budget_kind": budget_kind,
              "search_tokens": state["step"] * cfg.batch_size * settings["seq_len"],
              "candidates": state["candidates"], "choice": [c.name for c in choices],
              "probabilities": probs.tolist()}
    info = export_hybrid(model, choices, output, tokenizer=tokenizer, report=report, linear_modules=linear_modules)
    write_report(output, report, history, state["candidates"])
    return {**report, "output": output, "loads_with_transformers": info["loads_with_transformers"]}


def _finetune_parser(sub):
    from .finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="light distillation fine-tuning of an exported hybrid (LoRA on the non-full "
                                        "layers' projections + the linear candidates' parameters)")
    p.add_argument("path", help="hybrid directory written by `dash export`")
    p.add_argument("--teacher", help="teacher model (default: the one recorded in the hybrid's report)")
    p.add_argument("--data", nargs="+", help="text/jsonl files, folders or hf:<dataset>[:split] (default: offline "
                                            "corpus, as `dash search`)")
    p.add_argument("--tokens", type=int, default=None, help="fine-tuning tokens (default 2M on GPU, 16K on CPU)")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--rank", type=int, default=FinetuneConfig.rank, help="LoRA rank")
    p.add_argument("--seq-len", type=int, default=None, help="packed sequence length (default 4096 GPU, 1024 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 2 GPU, 1 CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="fine-tuned hybrid directory (default: <path>-ft)")
    p.add_argument("--no-progress", action="store_true")


def run_finetune(args) -> dict:
    from .finetune import finetune_hybrid

    return finetune_hybrid(args.path, args.output, teacher=args.teacher, data=args.data, tokens=args.tokens,
                           lr=args.lr, rank=args.rank, seq_len=args.seq_len, batch_size=args.batch_size,
                           device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None, seed=args.seed,
                           progress=not args.no_progress)


COMPARE_LENGTHS = (1024, 2048, 4096, 8192)  # RULER's lengths up to 8K, as far as the model's context goes


def _compare_parser(sub):
    from .finetune import FinetuneConfig

    p = sub.add_parser("compare", help="DASH against the selector baselines at several budgets (RULER + perplexity)")
    p.add_argument("--model", help="as for `dash search` (default: the embedded SmolLM2)")
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 6, 9], help="full-attention layers")
    p.add_argument("--methods", nargs="*", default=None, help="selectors (default: all of dash.baselines; "
                   "none: DASH alone)")
    p.add_argument("--skip-dash", action="store_true", help="the selectors only, no DASH search")
    p.add_argument("--search-objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES[:1]),
                   help=f"one DASH search per objective (`dash search --objective`): the default's "
                   f"({OBJECTIVES[0]}) row is 'dash', the others' 'dash_<objective>' (default: {OBJECTIVES[0]} alone)")
    p.add_argument("--search-relaxations", nargs="+", choices=list(RELAXATIONS), default=list(RELAXATIONS[:1]),
                   help="each search objective with each relaxation (`dash search --relaxation`); the "
                   "straight_through rows add '_st' to the name (default: mixture alone)")
    p.add_argument("--retrieval-fraction", type=float, default=RETRIEVAL_FRACTION, help="share of retrieval rows "
                   "in the data of the search and of the selectors' calibration (as for `dash search`)")
    p.add_argument("--answer-weight", type=float, default=SearchConfig.answer_weight, help="weight of the answer "
                   "tokens in the search's answers objective, and in the calibration loss of ppl_drop, kl_restore and "
                   "the refinement")
    p.add_argument("--search-answer-weight", type=float, default=None, help="the searches' own --answer-weight "
                   "(default: the selectors'): a run with another one searches again and keeps the selectors' rows")
    p.add_argument("--answer-first-weight", type=float, default=SearchConfig.answer_first_weight, help="the "
                   "weight of each prompt's first answer token in the answers_nll / answers_margin searches and "
                   "refinements (as for `dash search`; the other objectives and the selectors weigh it as any other): "
                   "a run with another one searches again and keeps the selectors' rows")
    p.add_argument("--prompts-per-row", type=int, default=PROMPTS_PER_ROW, help="retrieval prompts in each "
                   "retrieval row of the search's and the calibration's data (as for `dash search`)")
    p.add_argument("--retrieval-tasks", nargs="+", default=None, metavar="TASK[:WEIGHT]", help="the tasks of the "
                   "retrieval rows of the search's and the calibration's data, with their shares, or 'solved' (as "
                   "for `dash search`; resolved once, before any shard starts, and recorded as explicit weights)")
    p.add_argument("--refine-rounds", type=int, default=2, help="also score DASH's hybrid refined by this many "
                   "rounds of full-layer swaps that lower the search's own objective on the calibration rows "
                   "(dash.refine), as the row dash_refined; 0: off")
    p.add_argument("--refine-objective", choices=list(OBJECTIVES), default=None, help="the objective the "
                   "refinement lowers (default: the search's own); e.g. answers_nll, the mean KL plus the true "
                   "answers' NLL per prompt, the measure ppl_drop ranks layers by (answer-weighted NLL)")
    p.add_argument("--devices", nargs="+", default=None, help="run the comparison as shards (per budget: the "
                   "DASH search, the selectors) in parallel, one process per named device (a device may be "
                   "named twice: two processes share it), then merge; resumable like one process")
    p.add_argument("--selector-shards", type=int, default=3, help="with --devices: the selectors of each budget "
                   "split into this many shards (scoring a hybrid, not choosing it, is most of their time)")
    p.add_argument("--candidates", nargs="+", default=None, help="as for `dash search` (softmax family); "
                   "default: full and the efficient operator, the two the selectors choose between, so that every "
                   "hybrid has the same KV cache at a budget (more candidates let DASH's hybrid differ in cost: "
                   "the table's KV column shows it)")
    p.add_argument("--efficient", default=None, help="the efficient operator of the baselines (default: the "
                   "sink + window candidate if any, else the first non-full one)")
    p.add_argument("--search-tokens", type=int, default=None, help="per search (default 12.3M GPU, 16K CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="search and calibration length (default 4096 GPU)")
    p.add_argument("--calibration-tokens", type=int, default=65536, help="calibration rows of the scoring selectors "
                   "and the refinement, from the search's training rows (default 65536: 16 rows of 4K, about 8 of "
                   "them retrieval prompts)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="RULER prompt lengths (default: 1K, 2K, 4K and 8K, those the model's context holds)")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--samples", type=int, default=10, help="RULER samples per task and length (default 10: with "
                   "5, one task's score at one length moves in steps of 20 points and its binomial noise hides "
                   "differences of several points in the average; compare.md's paired bootstrap CI shows which "
                   "differences hold). A rerun with other --samples, --lengths, --tasks or --eval-batch scores "
                   "the stored hybrids again, without searching or selecting again")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="RULER prompts generated together (default on a GPU: all the samples of a task and length, "
                   "one generate call each; 1 on the CPU; shorter prompts are left-filled)")
    p.add_argument("--finetune-tokens", type=int, default=0, help="fine-tune every method's hybrid on this many "
                   "tokens before scoring, as `dash finetune` does (default 0: off)")
    p.add_argument("--finetune-rank", type=int, default=FinetuneConfig.rank, help="LoRA rank of that fine-tuning")
    p.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr, help="learning rate of that fine-tuning")
    p.add_argument("--output", default=os.path.join("runs", "compare"))
    p.add_argument("--import-scores", nargs="+", default=None, metavar="COMPARE_JSON", help="earlier compare.json "
                   "files: a hybrid they scored under the same evaluation settings is not scored again once its "
                   "held-out perplexity, computed again, matches (the data-free selectors and the bounds choose the "
                   "same layers in every run)")
    p.add_argument("--import-rows", nargs="+", default=None, metavar="COMPARE_JSON", help="earlier compare.json "
                   "files (a committed table): the rows this run would produce are taken from them where their "
                   "selection settings (seed, data, candidates, search, fine-tuning) match, so that a new method or "
                   "objective extends a table without searching or selecting its rows again (their hybrids' scores "
                   "are imported as by --import-scores)")
    p.add_argument("--score-cache", default="", help="folder of hybrid scores (default: <output>/scores): a hybrid "
                   "that another method already chose, with the same evaluation settings, takes those scores "
                   "instead of another RULER run (dash.compare.ScoreCache)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _shard_arguments(args) -> list:
    """The parent's settings, as every shard of a sharded `dash compare` repeats them."""
    out = []
    for flag, value in [("--model", args.model), ("--candidates", args.candidates), ("--efficient", args.efficient),
                        ("--search-tokens", args.search_tokens), ("--seq-len", args.seq_len),
                        ("--calibration-tokens", args.calibration_tokens), ("--lengths", args.lengths),
                        ("--tasks", args.tasks), ("--samples", args.samples), ("--eval-batch", args.eval_batch),
                        ("--finetune-tokens", args.finetune_tokens), ("--finetune-rank", args.finetune_rank),
                        ("--refine-rounds", args.refine_rounds), ("--refine-objective", args.refine_objective),
                        ("--retrieval-fraction", args.retrieval_fraction),
                        ("--answer-weight", args.answer_weight), ("--import-scores", args.import_scores),
                        ("--search-answer-weight", args.search_answer_weight),
                        ("--answer-first-weight", args.answer_first_weight),
                        ("--prompts-per-row", args.prompts_per_row),
                        ("--retrieval-tasks", args.retrieval_tasks),
                        ("--import-rows", args.import_rows),
                        ("--finetune-lr", args.finetune_lr), ("--dtype", args.dtype), ("--seed", args.seed)]:
        if value is not None:
            out += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return out


def _data_settings(args) -> dict:
    return {"retrieval_fraction": args.retrieval_fraction, "calibration_tokens": args.calibration_tokens,
            "answer_weight": args.answer_weight, "prompts_per_row": args.prompts_per_row,
            "retrieval_tasks": args.retrieval_tasks}


def _resolve_compare_tasks(args, model=None, tokenizer=None) -> None:
    """``args.retrieval_tasks`` as explicit ``task:weight`` specs (None: every task in turn), so that every shard
    builds the same rows and the table records the mix: 'solved' asks the teacher once (loaded here on the first
    device unless given)."""
    from .data import format_retrieval_tasks
    from .models import load_model

    if args.retrieval_tasks is None:
        return
    device = args.devices[0] if args.devices else args.device
    on_gpu = device.startswith("cuda")
    loaded_here = model is None and args.retrieval_tasks == ["solved"] and args.retrieval_fraction > 0
    if loaded_here:
        model, tokenizer = load_model(args.model, device=device,
                                      dtype=DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")])
    seq_len = args.seq_len or (4096 if on_gpu else 1024)
    weights = retrieval_task_weights(args.retrieval_tasks, model, tokenizer, seq_len, args.prompts_per_row,
                                     args.retrieval_fraction, args.seed, progress=not args.no_progress)
    if loaded_here:  # the parent of the shards keeps no GPU memory while they run
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    args.retrieval_tasks = format_retrieval_tasks(weights)


def run_compare(args) -> dict:
    from .baselines import METHODS
    from .candidates import Candidate
    from .compare import compare, comparison_candidates, comparison_data, run_sharded, search_settings
    from .data import parse_retrieval_tasks
    from .models import load_model
    from .supernet import build_supernet

    methods = METHODS if args.methods is None else args.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.devices:
        if args.skip_dash:
            raise SystemExit("--skip-dash is for one shard; --devices plans the shards itself")
        _resolve_compare_tasks(args)
        os.makedirs(args.output, exist_ok=True)
        settings = {"lengths": args.lengths, "tasks": args.tasks, "finetune_tokens": args.finetune_tokens,
                    "finetune_rank": args.finetune_rank, "finetune_lr": args.finetune_lr, "samples": args.samples,
                    "seed": args.seed, "refine_rounds": args.refine_rounds, "refine_objective": args.refine_objective,
                    **_data_settings(args),
                    **search_settings(args.search_answer_weight, args.answer_first_weight)}
        if args.selector_shards < 1:
            raise SystemExit(f"--selector-shards must be >= 1, got {args.selector_shards}")
        return run_sharded(_shard_arguments(args), args.budgets, methods, args.devices, args.output, settings,
                           selector_groups=args.selector_shards, search_objectives=args.search_objectives,
                           search_relaxations=args.search_relaxations, progress=not args.no_progress)
    on_gpu = args.device.startswith("cuda")
    seq_len = args.seq_len or (4096 if on_gpu else 1024)
    model, tokenizer = load_model(args.model, device=args.device,
                                  dtype=DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")])
    search_tokens = args.search_tokens or (12_300_000 if on_gpu else CPU_DEFAULT_TOKENS)
    _resolve_compare_tasks(args, model, tokenizer)
    made = comparison_data(tokenizer, seq_len, search_tokens, args.retrieval_fraction, args.calibration_tokens,
                           args.seed, args.device, prompts_per_row=args.prompts_per_row,
                           retrieval_tasks=parse_retrieval_tasks(args.retrieval_tasks))
    data, calibration, answers, heldout = made["data"], made["calibration"], made["answers"], made["heldout"]
    context = int(getattr(model.config, "max_position_embeddings", 8192))
    candidates = args.candidates
    if candidates is None:  # the selectors' two operators: DASH chooses from exactly what they choose from
        candidates = comparison_candidates(context, args.efficient)
    net = build_supernet(model, candidates)
    if net.linear_parameters():
        raise SystemExit("dash compare runs softmax-family candidates (linear ones need a bank per method)")
    names = [c.name for c in net.candidates]
    if args.efficient:
        efficient = Candidate.parse(args.efficient)
    else:
        sinks = [c for c in net.candidates if c.sink]
        efficient = sinks[0] if sinks else next(c for c in net.candidates if not c.is_full)
    if efficient.name not in names:
        raise SystemExit(f"--efficient {efficient.name} is not among the candidates {names}")
    if "full" not in names:
        raise SystemExit(f"--candidates must include full attention (the budget counts full layers), got {names}")
    lengths = args.lengths or [n for n in COMPARE_LENGTHS if n <= context]
    return compare(net, tokenizer, data, calibration, heldout, args.budgets, efficient,
                   methods=methods, search_tokens=search_tokens, search_batch=2 if on_gpu else 1,
                   lengths=lengths, tasks=args.tasks, samples=args.samples, seed=args.seed,
                   eval_batch=args.eval_batch or (args.samples if on_gpu else 1), refine_rounds=args.refine_rounds,
                   refine_objective=args.refine_objective,
                   output_dir=args.output, progress=not args.no_progress, finetune_tokens=args.finetune_tokens,
                   finetune_rank=args.finetune_rank, finetune_lr=args.finetune_lr, include_dash=not args.skip_dash,
                   search_objectives=args.search_objectives, search_relaxations=args.search_relaxations,
                   calibration_answers=answers,
                   answer_weight=args.answer_weight, search_answer_weight=args.search_answer_weight,
                   answer_first_weight=args.answer_first_weight,
                   data_settings=_data_settings(args),
                   score_cache=args.score_cache, import_scores=args.import_scores or (),
                   import_rows=args.import_rows or ())


def run_eval(args) -> dict:
    import math

    from .data import default_data, pack, read_documents
    from .export import HYBRID_FILE, load_hybrid
    from .models import load_model

    if args.model and os.path.exists(os.path.join(args.model, HYBRID_FILE)):
        from transformers import AutoTokenizer

        model = load_hybrid(args.model, device=args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_model(args.model, device=args.device)
    suite = getattr(args, "suite", "perplexity")
    result = {"model": args.model or "smollm2-135m-instruct"}
    if suite in ("perplexity", "all"):
        if args.data:
            data = pack(read_documents(args.data), tokenizer, args.seq_len, seed=args.seed, heldout_fraction=0.2)
        else:
            data = default_data(tokenizer, args.seq_len, 5 * args.tokens, seed=args.seed + 1, heldout_fraction=0.2)
        rows = data.heldout[: max(1, args.tokens // args.seq_len)].to(args.device)
        nll, count = 0.0, 0
        with torch.no_grad():
            for row in rows:
                logits = model(row[None], use_cache=False).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
                count += row.numel() - 1
        result.update(tokens=count, nll=nll / count, perplexity=math.exp(nll / count), seq_len=args.seq_len)
    if suite in ("ruler", "all"):
        from .ruler import TASKS, evaluate, markdown_table

        batch = getattr(args, "batch_size", None) or (args.samples if str(args.device).startswith("cuda") else 1)
        ruler = evaluate(model, tokenizer, args.lengths, args.tasks or TASKS, args.samples, seed=args.seed,
                         progress=not getattr(args, "no_progress", False), batch_size=batch)
        result["ruler"] = ruler
        result["ruler_table"] = markdown_table(ruler)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        if "ruler_table" in result:
            with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
                f.write(f"# RULER-style scores: {result['model']}\n\n{result['ruler_table']}\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _align_parser(sub)
    _search_parser(sub)
    _export_parser(sub)
    _finetune_parser(sub)
    _eval_parser(sub)
    _compare_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "align":
        meta = run_align(args)
        print(f"aligned the linear candidates {meta['kinds']} of {meta['num_layers']} layers on {meta['tokens']} "
              "tokens; held-out relative error per layer:")
        for kind, errors in meta["heldout_relative_error"].items():
            print(f"  {kind}: " + " ".join(f"{e:.3f}" for e in errors))
        print(f"bank written to {args.output}/ (linear_bank.safetensors, linear_bank.json)")
    elif args.command == "search":
        settings = resolve_search_settings(args)
        summary = run_search(settings, progress=not args.no_progress)
        full = sum(c == "full" for c in summary["choice"])
        timing = summary["timing"]
        print(f"search finished: {summary['steps']} steps, {summary['tokens']} tokens; "
              f"{full}/{len(summary['choice'])} layers choose full attention "
              f"(load {timing['load_s']:.0f} s, data {timing['data_s']:.0f} s, search {timing['search_s']:.0f} s "
              f"at {timing['tokens_per_s']:.0f} tokens/s)")
        print("per-layer choice:", " ".join(summary["choice"]))
        print(f"written to {settings['output']}/ (summary.json, history.json, search_state.pt, config.yaml)")
        if not args.no_export:  # end to end: the hybrid under the search's budget, with its report
            done = run_export(argparse.Namespace(search=settings["output"], budget=None, budget_kind=None,
                                                 budget_context=None, output=None))
            print(f"hybrid ({done['choice'].count('full')}/{len(done['choice'])} full-attention layers) and "
                  f"report written to {done['output']}/")
    elif args.command == "export":
        done = run_export(args)
        print(f"hybrid with {done['choice'].count('full')}/{len(done['choice'])} full-attention layers written to "
              f"{done['output']} (loads with plain transformers: {done['loads_with_transformers']}; "
              "always with dash.load_hybrid)")
    elif args.command == "finetune":
        done = run_finetune(args)
        kl = "" if done["heldout_kl_before"] is None else \
            f"; held-out distillation KL {done['heldout_kl_before']:.4f} -> {done['heldout_kl_after']:.4f}"
        print(f"fine-tuned {done['steps']} steps on {done['tokens']} tokens ({done['trained_parameters']} parameters: "
              f"LoRA on layers {done['adapted_layers']}, linear candidates of layers {done['linear_layers']}){kl}")
        print(f"written to {done['output']}/ (loads with dash.load_hybrid)")
    elif args.command == "eval":
        result = run_eval(args)
        if "perplexity" in result:
            print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} held-out tokens")
        if "ruler" in result:
            print(result["ruler_table"])
            print(f"RULER-style average: {100 * result['ruler']['average']:.1f}")
    elif args.command == "compare":
        run_compare(args)
        with open(os.path.join(args.output, "compare.md")) as f:
            print(f.read())
        print(f"written to {args.output}/ (compare.json, compare.md, compare.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
