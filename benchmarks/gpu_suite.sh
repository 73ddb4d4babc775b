#!/usr/bin/env bash
# Everything the GPU must confirm, in one device call: backends, GPU tests, benchmarks.
# Writes logs and JSON under $OUT (or ./gpu_out); prints the benchmark table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -m dash_kernels | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python benchmarks/bench_mixed_attention.py --out "$OUT/mixed_attention.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v Warning
fi
