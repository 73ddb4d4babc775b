#!/usr/bin/env bash
# Everything the GPU must confirm, in one device call (keep it under the 10-minute command limit):
# backends, GPU tests, the kernel benchmark, and (RUN_SEARCH=1) the search-step benchmark.
# Writes logs and JSON under $OUT (or ./gpu_out); prints the benchmark table last.
#   TEST_ARGS="-k qwen"   pass extra pytest arguments     SKIP_TESTS=1 / SKIP_BENCH=1   skip a part
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -m dash_kernels | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # note: -k "fp32" also matches test_triton_vs_fp32_reference[...]; select cases by their ids
  timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py ${TEST_ARGS:-} \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -E "plain|passed|failed|Error" | tail -20
fi
if [ "${RUN_SEARCH:-0}" = 1 ]; then
  timeout "${SEARCH_TIMEOUT:-200}" python benchmarks/bench_search.py --out "$OUT/search_step.json" 2>&1 | tail -12
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-300}" python benchmarks/bench_mixed_attention.py --out "$OUT/mixed_attention.json" \
    ${BENCH_ARGS:-} 2>&1 | grep -v Warning > "$OUT/bench.log"
  sed -n '/^GPU:/,$p' "$OUT/bench.log"
fi
