r"""One forward+backward of the mixed-attention op under Nsight Compute, and a short table of what ncu measured.

Run mode: warms the chosen method up (compiles, autotuning, caches), then runs one forward+backward between
cudaProfilerStart / cudaProfilerStop, so `ncu --profile-from-start off` measures exactly those kernels:
  ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --section LaunchStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      --csv --page details python benchmarks/ncu_mixed_attention.py --method "cuda[sm90tma+mma]" > ncu.csv
Summary mode: per kernel, duration, compute (SM) and memory throughput (% of peak; L1, L2 and DRAM apart),
achieved occupancy, registers, cycles per issued instruction, active threads per warp and the main warp stall
reasons, from that CSV:
  python benchmarks/ncu_mixed_attention.py --summarize ncu.csv
(gpu_suite.sh's part `ncu` does both for every NCU_METHODS entry.)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import defaultdict

# ncu's metric names (SpeedOfLight, Occupancy, LaunchStats, WarpStateStats sections) -> the table's columns
# in the table's order; threads/warp below 32 is divergence or idle lanes (the CUDA prep's lane-0 loop read 10)
COLUMNS = {
    "Duration": "duration",
    "Compute (SM) Throughput": "sm_%",
    "Memory Throughput": "mem_%",
    "L1/TEX Cache Throughput": "l1_%",
    "L2 Cache Throughput": "l2_%",
    "DRAM Throughput": "dram_%",
    "Achieved Occupancy": "occupancy_%",
    "Registers Per Thread": "regs",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    "Avg. Active Threads Per Warp": "threads/warp",
}
STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")  # cycles a warp waits per issue, by reason


def run(args) -> None:
    import torch

    from bench_mixed_attention import Case, build_methods, environment_set, make_inputs, mainloop_env, make_step

    cuda_mainloops = []
    if args.method.startswith("cuda["):
        mainloops = args.method[len("cuda["):-1]
        mainloop_env(mainloops)  # a clear error for a malformed pair
        cuda_mainloops = [mainloops]
    case = Case(args.shape, args.seq, args.set)
    q, k, v, w = make_inputs(case)
    methods = build_methods(case, q, k, v, w, cuda_mainloops=cuda_mainloops)
    if args.method not in methods:
        raise SystemExit(f"--method {args.method!r} unknown here; choose from {sorted(methods)}")
    method, inputs, env = methods[args.method]
    with environment_set(env):  # the forward and the backward both read it
        step = make_step(method, inputs, "fwd_bwd")  # runs once: compiles, autotunes
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def short_name(kernel: str) -> str:
    """'void dash::fwd_kernel<bf16, 128>(dash::FwdParams)' -> 'dash::fwd_kernel' (its last 60 characters)."""
    return re.split(r"[<(]", kernel)[0].split()[-1][-60:]


def summarize(path: str, out_json: str | None = None) -> dict:
    """{kernel (short name, with a call index when launched more than once): {column: value}} from ncu's CSV."""
    text = open(path, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')  # ncu prints its own lines (==PROF==) before the CSV
    if start < 0:
        raise SystemExit(f"{path}: no ncu CSV found (did ncu run? see its log)")
    kernels: dict = defaultdict(dict)
    stalls: dict = defaultdict(dict)
    for row in csv.DictReader(io.StringIO(text[start:])):
        name = f"{row['ID']}:{short_name(row['Kernel Name'])}"
        metric, value, unit = row["Metric Name"], row["Metric Value"], row.get("Metric Unit", "")
        if metric in COLUMNS:
            column = COLUMNS[metric] + (f" ({unit})" if metric == "Duration" else "")
            kernels[name][column] = value
        elif metric.startswith(STALL[0]) and metric.endswith(STALL[1]):
            try:
                stalls[name][metric[len(STALL[0]):-len(STALL[1])]] = float(value.replace(",", ""))
            except ValueError:  # "n/a"
                pass
    for name, by_reason in stalls.items():
        top = sorted(by_reason.items(), key=lambda kv: -kv[1])[:2]
        kernels[name]["top stalls"] = ", ".join(f"{reason} {value:.1f}" for reason, value in top)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(kernels, f, indent=1)
    return dict(kernels)


def print_table(kernels: dict) -> None:
    order = list(COLUMNS.values()) + ["top stalls"]
    columns = sorted({c for values in kernels.values() for c in values},
                     key=lambda c: (order.index(c.split(" (")[0]), c))  # "duration (unit)" by its base name
    print("| kernel | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, values in kernels.items():
        print(f"| {name} | " + " | ".join(str(values.get(c, "")) for c in columns) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fused", help="a bench_mixed_attention method: fused (Triton), "
                        "cuda[FWD+BWD], sdpa_cudnn, flex_causal, ...")
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--set", default="4cand")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--summarize", metavar="NCU_CSV", help="print the table of an ncu CSV instead of running")
    parser.add_argument("--json", help="with --summarize: also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.summarize:
        print_table(summarize(args.summarize, args.json))
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
