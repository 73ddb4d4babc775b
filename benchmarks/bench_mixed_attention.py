"""Benchmark the fused mixed attention against its baselines, in one run, on one GPU.

For each shape and candidate set, times (median of triton.testing.do_bench, after warm-up),
forward and forward+backward, bf16:
  fused          dash_kernels.mixed_attention (backend chosen by --backend, default triton)
  cuda[F+B]      the same with backend="cuda" (the CUDA C++ kernels of csrc/), where built: one column per
                 forward + backward mainloop pair of --cuda-mainloops (DASH_CUDA_FWD=F, DASH_CUDA_BWD=B,
                 set around each timed step), e.g. cuda[wmma+wmma] cuda[mma+mma] cuda[sm90+mma]
  flex_separate  (a) the same candidates run separately through FlexAttention, weighted and summed
  sdpa_cudnn     (b) cuDNN SDPA, one causal attention
  sdpa_flash     (c) flash SDPA, one causal attention
  flex_causal    (d) FlexAttention, one causal attention
Prints a table last and writes JSON (GPU, versions, shapes, ms, ratios).

  python benchmarks/bench_mixed_attention.py --out benchmarks/results/mixed_attention_h100.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = {
    # name: (Hq, Hkv, D)
    "qwen2.5-3b": (16, 2, 128),
    "smollm2-135m": (9, 3, 64),
}
CANDIDATE_SETS = {
    "4cand": ([None, 512, 2048, 512], [0, 0, 0, 64]),  # full, SWA-512, SWA-2048, sink-64 + SWA-512
    "2cand": ([None, 1024], [0, 0]),  # full, SWA-1024
}
TOKENS_PER_BATCH = 16384
# the CUDA backend's forward + backward mainloops (csrc/README.md); "wmma" is the default of each
CUDA_MAINLOOPS = ["wmma+wmma", "mma+mma", "sm90+mma", "sm90tma+mma", "sm90tma+sm90", "sm90overlap+sm90",
                  "sm90pingpong+sm90", "sm90lean+sm90lean", "sm90lean+sm90dq"]


@dataclass
class Case:
    shape: str
    seq: int
    cand_set: str

    @property
    def batch(self) -> int:
        return max(1, TOKENS_PER_BATCH // self.seq)


def causal_flops(batch, seq, heads_q, head_dim, mode):
    """FLOPs of one causal attention (half the T^2 matmul work); backward counted as 2.5x forward."""
    fwd = 4 * batch * heads_q * seq * seq * head_dim / 2
    return fwd if mode == "fwd" else 3.5 * fwd


def make_inputs(case: Case, device="cuda", dtype=torch.bfloat16, seed=0):
    heads_q, heads_kv, head_dim = SHAPES[case.shape]
    windows, _ = CANDIDATE_SETS[case.cand_set]
    gen = torch.Generator(device=device).manual_seed(seed)
    shape_q = (case.batch, case.seq, heads_q, head_dim)
    shape_kv = (case.batch, case.seq, heads_kv, head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, generator=gen)
    k = torch.randn(shape_kv, device=device, dtype=dtype, generator=gen)
    v = torch.randn(shape_kv, device=device, dtype=dtype, generator=gen)
    w = torch.softmax(torch.randn(len(windows), device=device, generator=gen), -1)
    return q, k, v, w


def cuda_column(mainloops: str) -> str:
    return f"cuda[{mainloops}]"


def mainloop_env(mainloops: str) -> dict:
    """'sm90+mma' -> the environment the CUDA backend reads at every call to pick its mainloops."""
    fwd, _, bwd = mainloops.partition("+")
    if not fwd or not bwd:
        raise ValueError(f"--cuda-mainloops: expected FWD+BWD (e.g. sm90+mma), got {mainloops!r}")
    return {"DASH_CUDA_FWD": fwd, "DASH_CUDA_BWD": bwd}


@contextlib.contextmanager
def environment_set(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_methods(case: Case, q, k, v, w, backend="triton", cuda_mainloops=()):
    """name -> (callable returning the output (inputs captured), its inputs, the environment it runs in).
    Baselines take [B, H, T, D] layouts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import dash_kernels
    from dash_kernels.backends import cuda_extension_available

    windows, sinks = CANDIDATE_SETS[case.cand_set]
    seq = case.seq
    qh, kh, vh = (t.transpose(1, 2).contiguous().detach().requires_grad_(True) for t in (q, k, v))
    # every shape compiles its own Flex kernel; past dynamo's recompile limit Flex would silently
    # fall back to its eager (dense) path and the baseline would be meaningless
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)

    def mask_mod_for(window, sink):
        def mask_mod(b, h, t, j):
            keep = j <= t
            if window is not None:
                near = (t - j) < window
                if sink:
                    near = near | (j < sink)
                keep = keep & near
            return keep
        return mask_mod

    block_masks = [create_block_mask(mask_mod_for(wd, s), None, None, seq, seq, device=q.device)
                   for wd, s in zip(windows, sinks)]
    causal_mask = create_block_mask(mask_mod_for(None, 0), None, None, seq, seq, device=q.device)

    def fused():
        return dash_kernels.mixed_attention(q, k, v, w, windows, sinks, backend=backend)

    def flex_separate():
        out = None
        for c, bm in enumerate(block_masks):
            o = w[c] * flex(qh, kh, vh, block_mask=bm, enable_gqa=True)
            out = o if out is None else out + o
        return out

    def flex_causal():
        return flex(qh, kh, vh, block_mask=causal_mask, enable_gqa=True)

    def sdpa(backend_enum):
        def run():
            with sdpa_kernel(backend_enum):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        return run

    def fused_cuda():  # the CUDA C++ kernels (csrc/), with the mainloops of the method's environment
        return dash_kernels.mixed_attention(q, k, v, w, windows, sinks, backend="cuda")

    cuda = ({cuda_column(m): (fused_cuda, (q, k, v, w), mainloop_env(m)) for m in cuda_mainloops}
            if cuda_extension_available() else {})
    return {
        "fused": (fused, (q, k, v, w), {}),
        **cuda,
        "flex_separate": (flex_separate, (qh, kh, vh, w), {}),
        "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), (qh, kh, vh), {}),
        "sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION), (qh, kh, vh), {}),
        "flex_causal": (flex_causal, (qh, kh, vh), {}),
    }


def make_step(fn, inputs, mode):
    """One timed unit: a forward (no autograd) or a forward + backward; compiled/warmed once here."""
    for t in inputs:
        t.requires_grad_(mode != "fwd")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn()
    else:
        dy = torch.randn_like(fn())

        def step():
            for t in inputs:
                t.grad = None
            fn().backward(dy)
    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return step


def time_method(fn, inputs, mode, env=None, warmup=25, rep=100):
    import triton

    with environment_set(env or {}):  # the forward and the backward both read it
        step = make_step(fn, inputs, mode)
        return triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=list(inputs),
                                       return_mode="median")


def environment():
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run(cases, modes, backend="triton", methods=None, on_row=None, cuda_mainloops=()):
    rows = []
    for case in cases:
        q, k, v, w = make_inputs(case)
        heads_q, heads_kv, head_dim = SHAPES[case.shape]
        built = build_methods(case, q, k, v, w, backend=backend, cuda_mainloops=cuda_mainloops)
        for mode in modes:
            row = {"shape": case.shape, "heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim,
                   "batch": case.batch, "seq": case.seq, "candidates": case.cand_set,
                   "windows": CANDIDATE_SETS[case.cand_set][0], "sinks": CANDIDATE_SETS[case.cand_set][1],
                   "mode": mode, "ms": {}, "errors": {}}
            for name, (fn, inputs, env) in built.items():
                if methods and name not in methods and not (name.startswith("cuda[") and "cuda" in methods):
                    continue
                try:
                    row["ms"][name] = time_method(fn, inputs, mode, env)
                except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                    row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    torch.cuda.synchronize()
            ms = row["ms"]
            if "fused" in ms:
                flops = causal_flops(case.batch, case.seq, heads_q, head_dim, mode)
                row["fused_causal_equiv_tflops"] = flops / ms["fused"] * 1e-9
                row["speedup_vs_flex_separate"] = ms.get("flex_separate", math.nan) / ms["fused"]
                row["ratio_to_flex_causal"] = ms["fused"] / ms.get("flex_causal", math.nan)
                row["ratio_to_cudnn_causal"] = ms["fused"] / ms.get("sdpa_cudnn", math.nan)
            for name in (n for n in ms if n.startswith("cuda[")):
                flops = causal_flops(case.batch, case.seq, heads_q, head_dim, mode)
                row.setdefault("cuda", {})[name] = {
                    "causal_equiv_tflops": flops / ms[name] * 1e-9,
                    "ratio_to_cudnn_causal": ms[name] / ms.get("sdpa_cudnn", math.nan),
                    "ratio_to_triton": ms[name] / ms.get("fused", math.nan)}
            rows.append(row)
            print(format_row(row), flush=True)
            if on_row:
                on_row(rows)
        del q, k, v, w, built
        torch.cuda.empty_cache()
    return rows


def format_row(row):
    ms = row["ms"]
    cells = " ".join(f"{name}={ms[name]:.3f}" for name in ms)
    extra = ""
    if "fused" in ms:
        extra = (f" | vs(a) {row['speedup_vs_flex_separate']:.2f}x faster, vs(d) {row['ratio_to_flex_causal']:.2f}x,"
                 f" vs cuDNN {row['ratio_to_cudnn_causal']:.2f}x")
    return f"{row['shape']:>13} T={row['seq']:<5} {row['candidates']} {row['mode']:<7} {cells}{extra}"


def table(rows):
    cuda = list(dict.fromkeys(n for r in rows for n in r["ms"] if n.startswith("cuda[")))
    head = ("| shape | T | B | set | mode | fused ms | (a) flex separate | (b) cuDNN | (c) flash | (d) flex causal "
            "| (a)/fused | fused/(d) | fused/cuDNN |" + "".join(f" {n} ms | {n}/cuDNN |" for n in cuda))
    lines = [head, "|" + " --- |" * (12 + 2 * len(cuda))]
    for r in rows:
        ms = r["ms"]

        def cell(name):
            return f"{ms[name]:.3f}" if name in ms else "n/a"

        def ratio(name):
            return f"{ms[name] / ms['sdpa_cudnn']:.2f}" if name in ms and "sdpa_cudnn" in ms else "n/a"
        lines.append(
            f"| {r['shape']} | {r['seq']} | {r['batch']} | {r['candidates']} | {r['mode']} | {cell('fused')} | "
            f"{cell('flex_separate')} | {cell('sdpa_cudnn')} | {cell('sdpa_flash')} | "
            f"{cell('flex_causal')} | {r.get('speedup_vs_flex_separate', math.nan):.2f} | "
            f"{r.get('ratio_to_flex_causal', math.nan):.2f} | {r.get('ratio_to_cudnn_causal', math.nan):.2f} |"
            + "".join(f" {cell(n)} | {ratio(n)} |" for n in cuda))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--sets", nargs="+", default=list(CANDIDATE_SETS), choices=list(CANDIDATE_SETS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of methods to time (\"cuda\": every --cuda-mainloops column)")
    parser.add_argument("--cuda-mainloops", nargs="+", default=CUDA_MAINLOOPS, metavar="FWD+BWD",
                        help="one CUDA column per forward + backward mainloop pair, where the extension is built "
                             f"(default: {' '.join(CUDA_MAINLOOPS)}; sm90* need a build with the CuTe headers)")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    for mainloops in args.cuda_mainloops:
        try:
            mainloop_env(mainloops)
        except ValueError as exc:
            parser.error(str(exc))
    if not torch.cuda.is_available():
        sys.exit("bench_mixed_attention: needs a CUDA GPU")
    cases = [Case(s, t, c) for s in args.shapes for t in args.seqs for c in args.sets]

    def save(rows):  # after every row: a run cut short still leaves its measurements
        result = {"environment": environment(), "tokens_per_batch": TOKENS_PER_BATCH, "dtype": "bfloat16",
                  "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms", "rows": rows}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return result

    rows = run(cases, args.modes, backend=args.backend, methods=args.methods, on_row=save,
               cuda_mainloops=args.cuda_mainloops)
    result = save(rows)
    print()
    print(f"GPU: {result['environment']['gpu']}  torch {result['environment']['torch']}  "
          f"triton {result['environment']['triton']}")
    print(table(rows))


if __name__ == "__main__":
    main()
