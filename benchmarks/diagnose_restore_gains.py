"""Per-layer gain of restoring one layer to full attention, under the search's two token weightings.

Starting from the all-efficient model (every layer the efficient candidate), restores one layer at a time to full
attention and reports the drop of KL(teacher || hybrid) on rows of the search's own default data, as the plain
mean over tokens (``uniform``) and weighted by the all-efficient model's per-token KL (``long_range``, see
``dash.search``). The top-K layers of each ranking show what each objective rewards, without a search. Runs on the
CPU (SmolLM2, two 2048-token rows: about 30 minutes on 2 cores).

``--hybrids NAME=L1,L2,...``: instead, score given hybrids (those layers full, the rest efficient) under both
weightings: does the objective itself prefer one method's layers to another's?

  python benchmarks/diagnose_restore_gains.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seq-len 2048 --rows 2
  python benchmarks/diagnose_restore_gains.py --seq-len 4096 --hybrids dash=0,6,7 kl_restore=7,14,15
"""
import argparse
import time

import torch

from dash.data import default_data
from dash.models import load_model
from dash.search import token_kl
from dash.supernet import build_supernet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="as for `dash search` (default: the embedded SmolLM2)")
    parser.add_argument("--efficient", default="sink64_swa512")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--hybrids", nargs="+", default=[], metavar="NAME=LAYERS",
                        help="score these hybrids (comma-separated full layers) instead of the per-layer gains")
    args = parser.parse_args(argv)
    hybrids = {}
    for spec in args.hybrids:
        name, _, layers = spec.partition("=")
        try:
            hybrids[name] = [int(x) for x in layers.split(",") if x]
        except ValueError:
            parser.error(f"--hybrids expects NAME=L1,L2,... (integers), got {spec!r}")
    model, tokenizer = load_model(args.model)
    net = build_supernet(model, ["full", args.efficient])
    rows = default_data(tokenizer, args.seq_len, args.rows * args.seq_len * 3, seed=0).train[: args.rows]
    head = model.get_output_embeddings()
    num_layers = len(net.states)

    def hybrid_kl(choice, teacher):
        out = []
        with torch.no_grad(), net.fixed(choice):
            for i, row in enumerate(rows):
                hidden = model.base_model(row[None], use_cache=False).last_hidden_state[0]
                out.append(token_kl(hidden, teacher[i], head.weight, head.bias))
        return torch.cat(out)

    started = time.time()
    with torch.no_grad(), net.teacher():
        teacher = [model.base_model(row[None], use_cache=False).last_hidden_state[0] for row in rows]
    efficient = hybrid_kl([1] * num_layers, teacher)
    weights = efficient / efficient.mean()
    top = weights.sort(descending=True).values[: len(weights) // 20].sum() / weights.sum()
    print(f"all-efficient KL {efficient.mean():.4f}; weight share of the top 5% tokens {top:.2f}", flush=True)
    if hybrids:
        for name, layers in hybrids.items():
            kl = hybrid_kl([0 if i in layers else 1 for i in range(num_layers)], teacher)
            print(f"{name:14s} full {layers}: uniform KL {kl.mean():.5f}  long_range KL {(weights * kl).mean():.5f}"
                  f"  ({time.time() - started:.0f} s)", flush=True)
        return
    gains = {"uniform": [], "long_range": []}
    for layer in range(num_layers):
        restored = hybrid_kl([0 if i == layer else 1 for i in range(num_layers)], teacher)
        gains["uniform"].append(float((efficient - restored).mean()))
        gains["long_range"].append(float((weights * (efficient - restored)).mean()))
        print(f"layer {layer:2d}: uniform gain {gains['uniform'][-1]:.5f}  long_range gain "
              f"{gains['long_range'][-1]:.5f}  ({time.time() - started:.0f} s)", flush=True)
    for name, gain in gains.items():
        order = sorted(range(num_layers), key=lambda i: -gain[i])
        print(name, "top K:", " ".join(f"{k}: {sorted(order[:k])}" for k in args.budgets))


if __name__ == "__main__":
    main()
