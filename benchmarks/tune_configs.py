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

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2)],
    "dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 3), (32, 128, 4, 3),
             (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (16, 128, 8, 2)],
    "dq": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2),
           (128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2)],
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
        for cfg_tuple in CANDIDATES[kernel]:
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
    triton_op.CONFIG_OVERRIDES.clear()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "shape": args.shape, "seq": args.seq,
                       "set": args.set, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
