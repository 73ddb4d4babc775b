"""Compile every Triton kernel for Hopper (sm_90) without a GPU (dash_kernels.compile_check).

The interpreter runs kernels as NumPy and misses what only the compiler checks (types, constexpr rules, layouts,
shared memory). This builds the real GPU code path at the launch settings the ops use and checks that the
products became tensor-core instructions (wgmma for the attention kernels) within the shared-memory limit.
"""
import json
import os
import subprocess
import sys

import pytest

try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError:  # pragma: no cover - very old triton
    GPUTarget = None


@pytest.mark.skipif(GPUTarget is None, reason="triton without GPUTarget")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_for_sm90_with_wgmma(head_dim, tmp_path):
    # a fresh process: conftest's TRITON_INTERPRET=1 turns @triton.jit into the interpreter here
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "dash_kernels.compile_check", "--head-dims", str(head_dim),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())
    names = {r["kernel"] for r in rows}
    assert {"mixed fwd SPLIT=False", "mixed dkdv EDGE_MODE=1", "gla chunk dqk path=1", "gdn bwd chunk"} <= names
    assert all(r["shared_bytes"] > 0 for r in rows)
