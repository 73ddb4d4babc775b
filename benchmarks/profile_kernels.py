"""Where the fused op's time goes: CUDA time per kernel (torch.profiler), beside one causal Flex attention.

For each candidate set, runs forward+backward a few times under the profiler and prints, per kernel,
the mean CUDA time of one call. The baseline row (one causal FlexAttention, forward+backward) is
profiled in the same process. ``--cuda-mainloops mma+mma sm90tma+mma`` profiles the CUDA backend's pairs too
(the first set, each pair's environment set around its runs), kernel by kernel beside Triton's.
  python benchmarks/profile_kernels.py --shape qwen2.5-3b --seq 4096 --sets 1cand 2cand 4cand
  python benchmarks/profile_kernels.py --sets 4cand --cuda-mainloops mma+mma sm90tma+mma
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_mixed_attention import (CANDIDATE_SETS, Case, build_methods, cuda_column, environment_set, make_inputs,
                                   mainloop_env, make_step)

# a single full candidate: what the mixture machinery costs when there is nothing to mix
SETS = dict(CANDIDATE_SETS, **{"1cand": ([None], [0])})


def kernel_times(fn, iters: int = 5) -> dict:
    """Mean CUDA ms per call of each kernel launched by fn()."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1000.0  # us -> ms
    return {name: ms / iters for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--sets", nargs="+", default=["1cand", "2cand", "4cand"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cuda-mainloops", nargs="+", default=[], metavar="FWD+BWD",
                        help="also profile these CUDA backend pairs (bench_mixed_attention.py --cuda-mainloops)")
    args = parser.parse_args()
    CANDIDATE_SETS.update(SETS)
    report = {"gpu": torch.cuda.get_device_name(), "shape": args.shape, "seq": args.seq, "runs": {}}
    for mainloops in args.cuda_mainloops:
        mainloop_env(mainloops)  # a clear error before any GPU work
    runs = [(name, name, "fused") for name in args.sets] + [("flex_causal", args.sets[0], "flex_causal")]
    runs += [(cuda_column(m), args.sets[0], cuda_column(m)) for m in args.cuda_mainloops]
    for name, cand_set, method_name in runs:
        case = Case(args.shape, args.seq, cand_set)
        q, k, v, w = make_inputs(case)
        methods = build_methods(case, q, k, v, w, cuda_mainloops=args.cuda_mainloops)
        method, inputs, env = methods[method_name]
        with environment_set(env):  # the forward and the backward both read it
            times = kernel_times(make_step(method, inputs, "fwd_bwd"))
        report["runs"][name] = times
        total = sum(times.values())
        print(f"== {name}: {total:.3f} ms of CUDA time per forward+backward")
        for kname, ms in list(times.items())[:8]:
            print(f"   {ms:8.3f} ms  {kname[:90]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
