"""pytest-benchmark view of bench_mixed_attention.py (same cases, same methods).

  pytest benchmarks/test_bench_mixed_attention.py -m gpu --benchmark-only --benchmark-columns=median,iqr
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_mixed_attention import CANDIDATE_SETS, SHAPES, Case, build_methods, make_inputs, make_step  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ["fused", "flex_separate", "sdpa_cudnn", "sdpa_flash", "flex_causal"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cand_set", list(CANDIDATE_SETS))
@pytest.mark.parametrize("seq", [4096, 8192])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixed_attention_speed(benchmark, shape, seq, cand_set, method, mode):
    case = Case(shape, seq, cand_set)
    q, k, v, w = make_inputs(case)
    fn, inputs, _ = build_methods(case, q, k, v, w)[method]
    timed = make_step(fn, inputs, mode)

    def step():
        timed()
        torch.cuda.synchronize()

    benchmark.extra_info.update(shape=shape, seq=seq, batch=case.batch, candidates=cand_set, mode=mode,
                                gpu=torch.cuda.get_device_name())
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
