"""The CUDA (sm90) backward's GQA group sum, in the kernel against after it, in one run.

The sm90 backward adds each query head's dK / dV (fp32) into a [B, T, Hkv, D] buffer by atomics (the default),
or (DASH_CUDA_GQA_SUM=aten, the earlier way) writes them per query head, [B, T, Hq, D], and sums each group with
ATen afterwards. Floor of what the atomics remove, at the issue's shape (B.T 16384, Hq 16, Hkv 2, D 128): the
per-head copies are 2 x 134 MB written by the kernel and read back by the sum, ~0.55 GB, ~0.2 ms at 3 TB/s; the atomics
add 2 x 134 MB of reductions in L2 instead (the 33 MB accumulator fits the H100's 50 MB L2).

Times the backward alone (cuda_op.mixed_attention_bwd on fixed forward outputs) with triton.testing.do_bench
(median, twice each way, alternately; the lower of the two reported), and checks that they agree (the same sums
in another order).
Usage: python benchmarks/bench_cuda_gqa_sum.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench_mixed_attention import CANDIDATE_SETS, SHAPES, TOKENS_PER_BATCH


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import triton.testing

    from dash_kernels.ops.mixed_attention import cuda_op
    from dash_kernels.ops.mixed_attention.spec import make_plan

    heads_q, heads_kv, head_dim = SHAPES["qwen2.5-3b"]
    windows, sinks = CANDIDATE_SETS["4cand"]
    plan = make_plan(windows, sinks)
    scale = head_dim ** -0.5
    rows = []
    for seq in args.seqs:
        batch = max(1, TOKENS_PER_BATCH // seq)
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q = torch.randn(batch, seq, heads_q, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(batch, seq, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        w = torch.softmax(torch.randn(len(windows), device="cuda", generator=gen), -1)
        dy = torch.randn_like(q)
        with torch.no_grad():
            _, o, lse = cuda_op.mixed_attention_fwd(q, k, v, w, plan, scale)
        results, grads = {}, {}
        for way in ("aten", "atomic", "aten", "atomic"):  # alternately: clocks drift over a run
            os.environ["DASH_CUDA_GQA_SUM"] = way
            fn = lambda: cuda_op.mixed_attention_bwd(dy, q, k, v, w, o, lse, plan, scale)  # noqa: E731
            grads[way] = fn()
            results.setdefault(way, []).append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        os.environ.pop("DASH_CUDA_GQA_SUM")
        agree = {name: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                 for name, a, b in zip(("dq", "dk", "dv"), grads["atomic"], grads["aten"])}
        row = {"seq": seq, "batch": batch, "ms_aten": min(results["aten"]), "ms_atomic": min(results["atomic"]),
               "runs_aten": results["aten"], "runs_atomic": results["atomic"], "max_rel_diff": agree}
        rows.append(row)
        print(f"T {seq}: backward {row['ms_aten']:.3f} ms (ATen group sum) -> {row['ms_atomic']:.3f} ms (atomics), "
              f"max rel diff {agree}", flush=True)
    out = {"device": torch.cuda.get_device_name(), "shape": "qwen2.5-3b", "candidates": "4cand", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    assert all(value < 1e-2 for row in rows for value in row["max_rel_diff"].values()), "the two ways disagree"


if __name__ == "__main__":
    main()
