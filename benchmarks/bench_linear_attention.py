"""Benchmark the linear-attention ops against flash-linear-attention and cuDNN attention, in one run.

For each shape, forward and forward+backward, bf16 (median of triton.testing.do_bench after warm-up):
  dash_gla        dash_kernels.gated_linear_attention (backend "auto": Triton on a GPU, chunked kernels)
  dash_gla_recurrent   the same op with its single-walk Triton kernels
  dash_gdn        dash_kernels.gated_delta_rule (backend "auto": Triton on a GPU, chunked WY kernels)
  fla_gla         fla.ops.gla.chunk_gla                       (when flash-linear-attention is installed)
  fla_gdn         fla.ops.gated_delta_rule.chunk_gated_delta_rule
  sdpa_cudnn      cuDNN SDPA, one causal softmax attention over the same q/k/v
A method that cannot run (not installed, refused on this Triton) is reported with its error, not fatal.
``--profile`` adds, per dash method and mode, the CUDA time of each kernel (torch.profiler), in the same run.

  python benchmarks/bench_linear_attention.py --out benchmarks/results/linear_attention_h200.json
  python benchmarks/bench_linear_attention.py --shapes h16_d128_T4096 --methods dash_gla dash_gdn --profile
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench_mixed_attention import environment, make_step, time_method
from profile_kernels import kernel_times

SHAPES = {
    # name: (B, T, H, D[, V]); V defaults to D
    "h16_d128_T4096": (4, 4096, 16, 128),
    "h16_d128_T16384": (4, 16384, 16, 128),
    "smollm2_h9_d64_T4096": (4, 4096, 9, 64),
    # the search's GLA candidate: its values carry a column of ones for the normaliser (V = D + 1)
    "search_gla_h16_d128_v129_T4096": (4, 4096, 16, 128, 129),
}


def make_inputs(batch, seq, heads, dim, value_dim=None, device="cuda", dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q = rnd(batch, seq, heads, dim).to(dtype)
    k = F.normalize(rnd(batch, seq, heads, dim), dim=-1).to(dtype)
    v = rnd(batch, seq, heads, value_dim or dim).to(dtype)
    g_gla = F.logsigmoid(rnd(batch, seq, heads, dim) + 4.0).div(16).to(dtype)  # as the dash candidate's gate
    g_gdn = F.logsigmoid(rnd(batch, seq, heads) + 4.0).to(dtype)
    beta = torch.sigmoid(rnd(batch, seq, heads)).to(dtype)
    return q, k, v, g_gla, g_gdn, beta


def build_methods(q, k, v, g_gla, g_gdn, beta):
    import dash_kernels
    from dash_kernels.ops.gla import interface as gla_interface

    def gla(algorithm):
        def run():
            gla_interface.TRITON_ALGORITHM = algorithm
            try:
                return dash_kernels.gated_linear_attention(q, k, v, g_gla, check_decay=False)[0]
            finally:
                gla_interface.TRITON_ALGORITHM = "chunk"
        return run

    methods = {
        "dash_gla": (gla("chunk"), (q, k, v, g_gla)),
        "dash_gla_recurrent": (gla("recurrent"), (q, k, v, g_gla)),
        "dash_gdn": (lambda: dash_kernels.gated_delta_rule(q, k, v, g_gdn, beta, check_decay=False)[0],
                     (q, k, v, g_gdn, beta)),
    }
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla

        methods["fla_gla"] = (lambda: chunk_gla(q, k, v, g_gla)[0], (q, k, v, g_gla))
        methods["fla_gdn"] = (lambda: chunk_gated_delta_rule(q, k, v, g_gdn, beta)[0], (q, k, v, g_gdn, beta))
    except Exception as exc:  # not installed here
        methods["fla"] = exc
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))

    def cudnn():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

    methods["sdpa_cudnn"] = (cudnn, (qh, kh, vh))
    return methods


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--profile", action="store_true", help="also CUDA time per kernel of the dash methods")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    report = {"environment": environment(), "dtype": "bfloat16", "rows": rows}
    try:
        import fla

        report["environment"]["fla"] = getattr(fla, "__version__", "installed")
    except ImportError:
        report["environment"]["fla"] = "not installed"
    for shape in args.shapes:
        tensors = make_inputs(*SHAPES[shape])
        methods = build_methods(*tensors)
        for mode in args.modes:
            row = {"shape": shape, "B_T_H_D": SHAPES[shape], "mode": mode, "ms": {}, "errors": {}}
            for name, entry in methods.items():
                if args.methods and name not in args.methods:
                    continue
                if isinstance(entry, Exception):
                    row["errors"][name] = f"{type(entry).__name__}: {entry}"
                    continue
                fn, inputs = entry
                try:
                    row["ms"][name] = time_method(fn, inputs, mode)
                    print(f"  {shape} {mode} {name}: {row['ms'][name]:.3f} ms", flush=True)
                    if args.profile and name.startswith("dash_"):
                        kernels = kernel_times(make_step(fn, inputs, mode))
                        row.setdefault("kernels_ms", {})[name] = {k: round(t, 4) for k, t in kernels.items()}
                        for kernel, t in list(kernels.items())[:8]:
                            print(f"      {t:7.3f} ms  {kernel[:90]}", flush=True)
                except Exception as exc:  # e.g. fla refusing a backward on this Triton
                    row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    torch.cuda.synchronize()
                if args.out:  # what a killed run measured so far survives
                    with open(args.out, "w") as f:
                        json.dump(dict(report, rows=rows + [row]), f, indent=1)
            ms = row["ms"]
            for op in ("gla", "gdn"):
                if f"dash_{op}" in ms and f"fla_{op}" in ms:
                    row[f"{op}_dash_over_fla"] = ms[f"dash_{op}"] / ms[f"fla_{op}"]
                if f"dash_{op}" in ms and "sdpa_cudnn" in ms:
                    row[f"{op}_dash_over_cudnn"] = ms[f"dash_{op}"] / ms["sdpa_cudnn"]
            rows.append(row)
            print(shape, mode, " ".join(f"{k}={v:.3f}" for k, v in ms.items()),
                  "| errors:", ", ".join(row["errors"]) or "none", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    names = sorted({n for r in rows for n in r["ms"]})
    print("\n| shape | mode | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | " + " | ".join(f"{r['ms'][n]:.3f}" if n in r["ms"] else "-"
                                                          for n in names) + " |")


if __name__ == "__main__":
    main()
