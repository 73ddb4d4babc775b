"""``dash`` command line. Today: ``dash search`` (stage 2) on the embedded SmolLM2 or any model.

Settings come from defaults, then a YAML file (``--config``), then command-line flags; the resolved
settings are written to ``<output>/config.yaml``. Re-running the same command resumes a killed search.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields

import torch

from .search import SearchConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_TOKENS = 16_384  # a smoke-sized search that finishes in minutes on a laptop CPU


def _search_parser(sub):
    p = sub.add_parser("search", help="stage 2: learn per-layer architecture logits (weights frozen)")
    p.add_argument("--config", help="YAML file with any of the settings below")
    p.add_argument("--model", help="'smollm2-135m-instruct' (default, embedded), a .gguf, a directory or a hub id")
    p.add_argument("--data", nargs="+", help="text/jsonl files or folders (default: offline synthetic corpus)")
    p.add_argument("--candidates", nargs="+", help="e.g. full swa512 swa2048 sink64_swa512 (default: by context)")
    p.add_argument("--per-kv-group", action="store_true", default=None, help="one mixture per KV-head group")
    p.add_argument("--seq-len", type=int, help="packed sequence length (default 2048 on GPU, 1024 on CPU)")
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
    p.add_argument("--no-progress", action="store_true")
    return p


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
        if key not in ("config", "command", "no_progress") and value is not None:
            settings[key] = value
    device = settings.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    settings.setdefault("model", "smollm2-135m-instruct")
    settings.setdefault("dtype", "bfloat16" if on_gpu else "float32")
    settings.setdefault("seq_len", 2048 if on_gpu else 1024)
    settings.setdefault("tokens", SearchConfig.tokens if on_gpu else CPU_DEFAULT_TOKENS)
    settings.setdefault("batch_size", 4 if on_gpu else 1)
    settings.setdefault("output", os.path.join("runs", "search"))
    settings.setdefault("seed", 0)
    known = {f.name for f in fields(SearchConfig)} | {"model", "data", "candidates", "per_kv_group", "seq_len",
                                                       "output", "device", "dtype"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {sorted(known)}")
    if settings["dtype"] not in DTYPES:
        raise SystemExit(f"dtype must be one of {list(DTYPES)}, got {settings['dtype']!r}")
    return settings


def run_search(settings: dict, progress: bool = True) -> dict:
    import yaml

    from .data import default_data, pack, read_documents
    from .models import load_model
    from .search import Search
    from .supernet import build_supernet

    os.makedirs(settings["output"], exist_ok=True)
    with open(os.path.join(settings["output"], "config.yaml"), "w") as f:
        yaml.safe_dump(settings, f, sort_keys=True)
    model, tokenizer = load_model(settings["model"], device=settings["device"], dtype=DTYPES[settings["dtype"]])
    seq_len, tokens, seed = settings["seq_len"], settings["tokens"], settings["seed"]
    if settings.get("data"):
        data = pack(read_documents(settings["data"]), tokenizer, seq_len, seed=seed)
    else:
        data = default_data(tokenizer, seq_len, min(tokens, 2_000_000), seed=seed)
    net = build_supernet(model, settings.get("candidates"), per_kv_group=bool(settings.get("per_kv_group")))
    same_as_full = [c.name for c in net.candidates if c.window is not None and c.window >= seq_len]
    if same_as_full:
        print(f"warning: {same_as_full} cover every position of a {seq_len}-token sequence, so the search cannot "
              "tell them from full attention; use a longer --seq-len", file=sys.stderr)
    search_fields = {f.name for f in fields(SearchConfig)}
    config = SearchConfig(**{k: v for k, v in settings.items() if k in search_fields})
    summary = Search(net, data, config, settings["output"]).run(progress=progress)
    summary["candidates"] = [c.name for c in net.candidates]
    with open(os.path.join(settings["output"], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _search_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "search":
        settings = resolve_search_settings(args)
        summary = run_search(settings, progress=not args.no_progress)
        full = sum(c == "full" for c in summary["choice"])
        print(f"search finished: {summary['steps']} steps, {summary['tokens']} tokens; "
              f"{full}/{len(summary['choice'])} layers choose full attention")
        print("per-layer choice:", " ".join(summary["choice"]))
        print(f"written to {settings['output']}/ (summary.json, history.json, search_state.pt, config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
