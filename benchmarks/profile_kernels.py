"""Where the fused op's time goes: CUDA time per kernel (torch.profiler), beside one causal Flex attention.

For each candidate set, runs forward+backward a few times under the profiler and prints, per kernel,
the mean CUDA time of one call. The baseline row (one causal FlexAttention, forward+backward) is
profiled in the same process.
  python benchmarks/profile_kernels.py --shape qwen2.5-3b --seq 4096 --sets 1cand 2cand 4cand
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_mixed_attention import CANDIDATE_SETS, Case, build_methods, make_inputs

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
    args = parser.parse_args()
    CANDIDATE_SETS.update(SETS)
    report = {"gpu": torch.cuda.get_device_name(), "shape": args.shape, "seq": args.seq, "runs": {}}
    for name in args.sets + ["flex_causal"]:
        case = Case(args.shape, args.seq, args.sets[0] if name == "flex_causal" else name)
        q, k, v, w = make_inputs(case)
        methods = build_methods(case, q, k, v, w)
        method, inputs, _ = methods["flex_causal" if name == "flex_causal" else "fused"]
        for t in inputs:
            t.requires_grad_(True)
        dy = torch.randn_like(method())

        def step():
            for t in inputs:
                t.grad = None
            method().backward(dy)

        times = kernel_times(step)
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
