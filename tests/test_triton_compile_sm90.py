"""Compile every Triton kernel for Hopper (sm_90) without a GPU.

The interpreter runs kernels as NumPy and misses what only the compiler checks (types,
constexpr rules, layouts). This builds the real GPU code path with the GPU tile configs and
checks that the matrix products became warpgroup MMAs (wgmma).
"""
import os
import subprocess
import sys

import pytest
import triton

from dash_kernels.ops.mixed_attention import triton_kernels as kern
from dash_kernels.ops.mixed_attention.triton_op import _block_d, _gpu_configs

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - very old triton
    GPUTarget = None

POINTER_TYPES = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Y": "*bf16", "O": "*bf16", "DY": "*bf16",
    "DQ": "*bf16", "DK": "*bf16", "DV": "*bf16", "CAND": "*i32", "MEMBERSHIP": "*i32",
}


def _compile(fn, constexprs, num_warps, num_stages):
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.isupper() and param.name not in ("T", "H", "NT", "HQ", "GROUP"):
            signature[param.name] = POINTER_TYPES.get(param.name, "*fp32")
        elif param.name in ("qk_scale", "sm_scale", "scale"):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    # what a real launch specializes on: 16-byte aligned pointers, strides and lengths divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if not p.is_constexpr and signature[p.name] != "fp32"
             and not p.name.endswith("_d") and p.name not in ("H", "NT", "HQ", "GROUP")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_all(head_dim):
    configs = _gpu_configs(head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_C=4, DOT_PRECISION="tf32")
    regions = dict(NB=2, NS=1)
    # both code paths of each kernel (see TileConfig.specialize_edges)
    builds = [
        (f"{name}/{variant}", fn, dict(constexprs, **{flag: variant}), configs[name])
        for name, fn, constexprs, flag, variants in [
            ("fwd", kern._mixed_attn_fwd, dict(common, HAS_SINK=True), "SPLIT", (False, True)),
            ("dkdv", kern._mixed_attn_bwd_dkdv, dict(common, **regions), "EDGE_MODE", (1, 2)),
            ("dq", kern._mixed_attn_bwd_dq, dict(common, **regions), "EDGE_MODE", (1, 2)),
        ]
        for variant in variants
    ]
    for name, fn, constexprs, cfg in builds:
        constexprs = dict(constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        compiled = _compile(fn, constexprs, cfg.num_warps, cfg.num_stages)
        assert "wgmma.mma_async" in compiled.asm["ptx"], f"{name}: matrix products did not become wgmma"
    prep = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_C=4, NUM_R=6, BLOCK_M=64)
    _compile(kern._mixed_attn_bwd_prep, prep, 4, 1)
    # gated linear attention (fused recurrent), at the search's linear candidate shape (V = D + 1)
    from dash_kernels.ops.gla import triton_recurrent as gla

    dims = dict(KD=head_dim, VD=head_dim + 1, BK=gla._block(head_dim), BV=gla._value_tile(head_dim, head_dim + 1))
    _compile(gla._gla_fwd_kernel, dict(dims, HAS_H0=True, STORE_HT=True), 4, 2)
    _compile(gla._gla_bwd_dq_kernel, dict(dims, HAS_H0=True), 4, 2)
    _compile(gla._gla_bwd_dkdv_kernel, dict(dims, HAS_DHT=True, STORE_DH0=True), 4, 2)
    from dash_kernels.ops.gla import triton_chunk as chunk

    bt, bc = chunk.chunk_sizes(False)
    dims = dict(KD=head_dim, VD=head_dim + 1, BK=chunk._block(head_dim), BV=min(chunk._block(head_dim + 1), 64),
                BT=bt, DOT_PRECISION="tf32")
    walk = dict(dims, **dict(zip(("BK", "BV"), chunk.walk_tiles(head_dim, head_dim + 1))))
    intra = dict(KD=head_dim, BK=chunk._block(head_dim), BT=bt, BC=bc, BKS=chunk.DIAG_KEY_SLICE, DOT_PRECISION="tf32")
    for name, fn, constexprs in [
        ("intra", chunk._gla_intra_kernel, intra),
        ("states", chunk._gla_states_kernel, dict(walk, HAS_H0=True, STORE_HT=True)),
        ("output", chunk._gla_output_kernel, dims),
        ("dstates", chunk._gla_dstates_kernel, dict(walk, HAS_DHT=True, STORE_DH0=True)),
        ("bwd", chunk._gla_chunk_bwd_kernel, dict(dims, BC=bc, BKS=chunk.DIAG_KEY_SLICE, KS=min(dims["BK"], chunk.backward_key_slice(bt)))),
    ]:
        launch = chunk.LAUNCH[name]
        compiled = _compile(fn, constexprs, launch["num_warps"], launch["num_stages"])
        # what the launch would need: more than Hopper's 227 KB of shared memory fails at run time
        assert compiled.metadata.shared <= 232448, f"{name}: {compiled.metadata.shared} B of shared memory"
    # gated delta rule (chunked WY), at the launch settings of triton_chunk.py (4 warps, 1 stage)
    from dash_kernels.ops.gated_delta import triton_chunk as gdn

    bt = gdn.chunk_size(False)
    common = dict(KD=head_dim, BK=gdn._block(head_dim), BT=bt, DOT_PRECISION="tf32")
    values = dict(common, VD=head_dim, BV=min(gdn._block(head_dim), 64))
    bwd_values = dict(values, BV=gdn.backward_value_tile(head_dim, head_dim))
    for name, fn, constexprs in [
        ("prep", gdn._gdn_prep_kernel, dict(values, INV_PRECISION="tf32x3")),
        ("fwd", gdn._gdn_fwd_kernel, dict(values, BV=gdn.walk_value_tile(head_dim), HAS_H0=True, STORE_HT=True)),
        ("output", gdn._gdn_output_kernel, values),
        ("bwd_state", gdn._gdn_bwd_state_kernel, dict(bwd_values, HAS_DHT=True, STORE_DH0=True)),
        ("bwd_chunk", gdn._gdn_bwd_chunk_kernel, dict(common, NV=2, KS=min(common["BK"], gdn.backward_key_slice(bt)))),
    ]:
        compiled = _compile(fn, constexprs, 4, 1)
        assert "mma" in compiled.asm["ptx"], f"gdn {name}: no tensor-core products"
        assert compiled.metadata.shared <= 232448, f"gdn {name}: {compiled.metadata.shared} B of shared memory"
        assert "mma" in compiled.asm["ptx"], f"{fn.__name__}: no tensor-core products"


@pytest.mark.skipif(GPUTarget is None, reason="triton without GPUTarget")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_for_sm90_with_wgmma(head_dim):
    # a fresh process: conftest's TRITON_INTERPRET=1 turns @triton.jit into the interpreter here
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import test_triton_compile_sm90 as t; t.compile_all({head_dim})"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
