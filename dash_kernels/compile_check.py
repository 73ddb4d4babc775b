"""Compile every Triton kernel of the package for a GPU architecture without a GPU, and report what ptxas says.

The interpreter runs kernels as NumPy and misses what only the compiler checks (types, constexpr rules, layouts,
shared memory). This builds the real GPU code path with the launch settings the ops use, and, where Triton ships
ptxas, reports registers and spills per kernel: a register spill in a hot loop costs more than most tile choices,
and it is visible here, on a CPU, before any GPU time is spent.

  python -m dash_kernels.compile_check               # sm_90, head dims 64 and 128: a table
  python -m dash_kernels.compile_check --head-dims 128 --json out.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

HOPPER_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90

POINTER_TYPES = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Y": "*bf16", "O": "*bf16", "DY": "*bf16",
    "DQ": "*bf16", "DK": "*bf16", "DV": "*bf16", "CAND": "*i32", "MEMBERSHIP": "*i32",
    "ONE_PRODUCT": "*i8", "A": "*bf16",  # A: the GLA intra-chunk matrix (bf16 for bf16 inputs)
}
SCALARS_FP32 = ("qk_scale", "sm_scale", "scale")
UNALIGNED_INTS = ("H", "NT", "HQ", "GROUP", "TILE0", "N_TILES")  # head, chunk and tile counts: any value


@dataclass
class Build:
    name: str
    fn: object
    constexprs: dict
    num_warps: int
    num_stages: int
    wants_mma: str = ""  # "wgmma" or "mma": the products must reach the tensor cores


def builds(head_dim: int) -> Iterator[Build]:
    """Every kernel at the settings its launcher uses for this head dim (bf16 inputs, V = D + 1 for GLA as in
    the search's linear candidate)."""
    from .ops.gated_delta import triton_chunk as gdn
    from .ops.gla import triton_chunk as gla_chunk
    from .ops.gla import triton_recurrent as gla_rec
    from .ops.mixed_attention import triton_kernels as kern
    from .ops.mixed_attention.triton_op import _block_d, _gpu_configs

    configs = _gpu_configs(head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_C=4, DOT_PRECISION="tf32")
    regions = dict(NB=2, NS=1)
    for name, fn, constexprs, flag, variants in [
        ("mixed fwd", kern._mixed_attn_fwd, dict(common, HAS_SINK=True), "SPLIT", (False, True)),
        ("mixed dkdv", kern._mixed_attn_bwd_dkdv, dict(common, **regions), "EDGE_MODE", (1, 2)),
        ("mixed dq", kern._mixed_attn_bwd_dq, dict(common, **regions), "EDGE_MODE", (1, 2)),
    ]:
        cfg = configs[name.split()[1]]
        for variant in variants:
            yield Build(f"{name} {flag}={variant}", fn,
                        dict(constexprs, **{flag: variant}, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                        cfg.num_warps, cfg.num_stages, "wgmma")
    yield Build("mixed bwd prep", kern._mixed_attn_bwd_prep,
                dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_C=4, NUM_R=6, BLOCK_M=64), 4, 1)

    dims = dict(KD=head_dim, VD=head_dim + 1, BK=gla_rec._block(head_dim),
                BV=gla_rec._value_tile(head_dim, head_dim + 1))
    yield Build("gla recurrent fwd", gla_rec._gla_fwd_kernel, dict(dims, HAS_H0=True, STORE_HT=True), 4, 2)
    yield Build("gla recurrent dq", gla_rec._gla_bwd_dq_kernel, dict(dims, HAS_H0=True), 4, 2)
    yield Build("gla recurrent dkdv", gla_rec._gla_bwd_dkdv_kernel, dict(dims, HAS_DHT=True, STORE_DH0=True), 4, 2)

    bt = gla_chunk.chunk_size(False)
    bk = gla_chunk._block(head_dim)
    ks = min(bk, gla_chunk.key_slice(bt))
    dims = dict(KD=head_dim, VD=head_dim + 1, BK=bk, BV=min(gla_chunk._block(head_dim + 1), 64), BT=bt,
                DOT_PRECISION="tf32")
    walk = dict(dims, **dict(zip(("BK", "BV"), gla_chunk.walk_tiles(head_dim, head_dim + 1))))
    launch = gla_chunk.LAUNCH
    for name, key, fn, constexprs in [
        ("cumsum", "cumsum", gla_chunk._gla_cumsum_kernel,
         dict(KD=head_dim, BT=bt, KS=ks, SAFE_SPAN=gla_chunk.ONE_PRODUCT_SPAN)),
        *[(f"intra path={path}", ("intra", path), gla_chunk._gla_intra_kernel,
           dict(KD=head_dim, BK=bk, BT=bt, KS=ks, PATH=path, PRECISE="tf32x3")) for path in (1, 0)],
        ("states", "states", gla_chunk._gla_states_kernel, dict(walk, HAS_H0=True, STORE_HT=True)),
        ("output", "output", gla_chunk._gla_output_kernel, dims),
        ("dstates", "dstates", gla_chunk._gla_dstates_kernel, dict(walk, HAS_DHT=True, STORE_DH0=True)),
        ("dv", "dv", gla_chunk._gla_bwd_dv_kernel, dict(dims, KS=ks)),
        *[(f"dqk path={path}", ("dqk", path), gla_chunk._gla_bwd_dqk_kernel,
           {**{k: v for k, v in dims.items() if k != "BK"}, "KS": ks, "PATH": path, "PRECISE": "tf32x3",
            "V_WHOLE": (head_dim + 1) // dims["BV"] * dims["BV"], "BV_TAIL": 16})
          for path in (1, 0)],
    ]:
        wants = "" if name == "cumsum" or name == "intra path=0" else "mma"
        yield Build(f"gla chunk {name}", fn, constexprs, launch[key]["num_warps"], launch[key]["num_stages"], wants)

    bt = gdn.chunk_size(False)
    bk = gdn._block(head_dim)
    base = dict(KD=head_dim, BK=bk, BT=bt, DOT_PRECISION="tf32")
    values = dict(base, VD=head_dim, BV=min(gdn._block(head_dim), 64))
    bwd_values = dict(values, BV=gdn.backward_value_tile(head_dim, head_dim))
    nv = -(-head_dim // bwd_values["BV"])
    for name, fn, constexprs, warps in [
        *[(f"prep blocks={nb}", gdn._gdn_prep_kernel, dict(values, INV_PRECISION="tf32x3", INV_BLOCKS=nb),
           gdn.PREP_WARPS[nb]) for nb in (4, 8)],
        ("fwd walk", gdn._gdn_fwd_kernel,
         dict(values, BV=gdn.walk_value_tile(head_dim), HAS_H0=True, STORE_HT=True), 4),
        ("output", gdn._gdn_output_kernel, values, 4),
        ("bwd local", gdn._gdn_bwd_local_kernel, dict(values, BV=min(gdn._block(head_dim), 64)), 4),
        ("bwd walk", gdn._gdn_bwd_walk_kernel,
         dict(values, BV=gdn.walk_value_tile(head_dim), HAS_DHT=True, STORE_DH0=True), 8),
        ("bwd partials", gdn._gdn_bwd_partials_kernel, bwd_values, 8),
        ("bwd chunk", gdn._gdn_bwd_chunk_kernel, dict(base, NV=nv, KS=min(bk, gdn.backward_key_slice(bt))), 8),
    ]:
        yield Build(f"gdn {name}", fn, constexprs, warps, 1, "mma")


def compile_build(build: Build, arch: int = 90):
    """triton.compile of one build for ``sm_<arch>`` with the specialisations a real launch gets (16-byte
    aligned pointers, strides and lengths divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = build.fn
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.isupper() and param.name not in ("T", "TP", "V0") + UNALIGNED_INTS:
            signature[param.name] = POINTER_TYPES.get(param.name, "*fp32")
        elif param.name in SCALARS_FP32:
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if not p.is_constexpr and signature[p.name] != "fp32"
             and not p.name.endswith("_d") and p.name not in UNALIGNED_INTS}
    src = ASTSource(fn=fn, signature=signature, constexprs=build.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=build.num_warps, num_stages=build.num_stages))


def ptxas_path(arch: int = 90) -> Optional[str]:
    """The ptxas Triton itself uses for this architecture (it emits PTX of that ptxas's version)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # older Triton: the binary it ships
        import triton

        found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
        return found[0] if found else None


def ptxas_usage(ptx: str, arch: int = 90) -> Optional[dict]:
    """Registers and spill bytes per thread, from ``ptxas -v`` (None where no ptxas is found)."""
    ptxas = ptxas_path(arch)
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""  # wgmma and setmaxnreg need sm_90a
        done = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    regs = re.findall(r"Used (\d+) registers", done.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return {"registers": int(regs[-1]) if regs else None,
            "spill_stores": int(spills[-1][0]) if spills else 0, "spill_loads": int(spills[-1][1]) if spills else 0}


def check(head_dims=(64, 128), arch: int = 90, with_ptxas: bool = True) -> list:
    """Compiles every build; returns one row per kernel. Raises on a failed compile, on products that did not
    reach the tensor cores, or on shared memory over the sm_90 limit."""
    rows = []
    for head_dim in head_dims:
        for build in builds(head_dim):
            compiled = compile_build(build, arch)
            ptx = compiled.asm["ptx"]
            if build.wants_mma == "wgmma" and arch == 90 and "wgmma.mma_async" not in ptx:
                raise AssertionError(f"{build.name} (D {head_dim}): matrix products did not become wgmma")
            if build.wants_mma == "mma" and "mma" not in ptx:
                raise AssertionError(f"{build.name} (D {head_dim}): no tensor-core products")
            shared = compiled.metadata.shared
            if shared > HOPPER_SHARED_LIMIT:
                raise AssertionError(f"{build.name} (D {head_dim}): {shared} B of shared memory, over the limit")
            row = {"kernel": build.name, "head_dim": head_dim, "num_warps": build.num_warps,
                   "num_stages": build.num_stages, "shared_bytes": shared}
            if with_ptxas:
                row.update(ptxas_usage(ptx, arch) or {})
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    rows = check(args.head_dims, args.arch)
    print(f"{'kernel':<26} {'D':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st/ld (B)':>16} {'smem KB':>8}")
    for r in rows:
        spill = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
        print(f"{r['kernel']:<26} {r['head_dim']:>4} {r['num_warps']:>5} {r['num_stages']:>6} "
              f"{r.get('registers', '?'):>5} {spill:>16} {r['shared_bytes'] / 1024:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
