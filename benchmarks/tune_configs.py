"""Time the Triton kernels of mixed_attention under several tile configs (one kernel varied at a time).

Each config's output is checked against the default config's (a miscompile shows up here).
  python benchmarks/tune_configs.py --shape qwen2.5-3b --seq 4096 --set 4cand
"""
import argparse
import json
import math

import torch
import triton

from bench_mixed_attention import CANDIDATE_SETS, Case, make_inputs
from dash_kernels.ops.mixed_attention import triton_op
from dash_kernels.ops.mixed_attention.spec import make_plan
from dash_kernels.ops.mixed_attention.triton_op import TileConfig

# (BLOCK_M, BLOCK_N, warps, stages, specialize_edges)
CANDIDATES = {
    128: {
        "fwd": [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 2, False), (64, 64, 4, 3, False),
                (64, 64, 4, 3, True)],
        "dkdv": [(32, 128, 8, 2, True), (32, 128, 8, 2, False), (16, 64, 4, 3, True), (32, 64, 4, 2, True),
                 (64, 128, 8, 2, True)],
        "dq": [(128, 32, 8, 2, True), (128, 32, 8, 2, False), (64, 32, 4, 3, True), (128, 64, 8, 3, True),
               (64, 64, 4, 2, True)],
    },
    64: {
        "fwd": [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 64, 4, 3, False), (128, 128, 8, 2, False)],
        "dkdv": [(64, 128, 8, 2, True), (32, 128, 8, 2, True), (32, 64, 4, 3, True), (64, 64, 4, 2, True)],
        "dq": [(128, 64, 8, 2, True), (128, 32, 4, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 2, True)],
    },
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--set", default="4cand")
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dkdv", "dq"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    case = Case(args.shape, args.seq, args.set)
    q, k, v, w = make_inputs(case)
    windows, sinks = CANDIDATE_SETS[case.cand_set]
    plan = make_plan(windows, sinks)
    scale = 1 / math.sqrt(q.shape[-1])
    y, o, lse = triton_op.mixed_attention_fwd(q, k, v, w, plan, scale)
    dy = torch.randn_like(y)
    base_bwd = triton_op.mixed_attention_bwd(dy, q, k, v, w, o, lse, plan, scale)
    results = []
    for kernel in args.kernels:
        for cfg_tuple in CANDIDATES[128 if q.shape[-1] > 64 else 64][kernel]:
            cfg = TileConfig(*cfg_tuple)
            if kernel == "fwd" and cfg.block_m < 64 and q.shape[-1] == 128 and cfg.block_n > 64:
                continue
            triton_op.CONFIG_OVERRIDES.clear()
            triton_op.CONFIG_OVERRIDES[kernel] = cfg
            try:
                if kernel == "fwd":
                    fn = lambda: triton_op.mixed_attention_fwd(q, k, v, w, plan, scale)
                    got = fn()[0]
                    diff = (got.float() - y.float()).abs().max().item()
                else:
                    fn = lambda: triton_op.mixed_attention_bwd(dy, q, k, v, w, o, lse, plan, scale)
                    got = fn()
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got[:3], base_bwd[:3]))
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row = {"kernel": kernel, "config": cfg_tuple, "ms": ms, "max_diff_vs_default": diff}
            except Exception as exc:
                row = {"kernel": kernel, "config": cfg_tuple, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            results.append(row)
            print(json.dumps(row), flush=True)
            _save(args, results, {})
    triton_op.CONFIG_OVERRIDES.clear()
    best = {}
    for row in results:
        if "ms" in row and (row["kernel"] not in best or row["ms"] < best[row["kernel"]]["ms"]):
            best[row["kernel"]] = row
    for kernel, row in best.items():
        print(f"best {kernel}: {row['config']} {row['ms']:.3f} ms")
    _save(args, results, best)


def _save(args, results, best):
    """Written after every row, so a run stopped by a time limit keeps what it measured."""
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "shape": args.shape, "seq": args.seq,
                       "set": args.set, "note": "fwd rows time the forward; dkdv/dq rows time the whole backward",
                       "results": results, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
