#!/usr/bin/env bash
# What the GPU must confirm, in parts that each fit one device call (10-minute command limit).
# Writes logs and JSON under $OUT (or ./gpu_out); prints short tables last.
#   PARTS="tests bench"          which parts, in order (default: tests bench)
#     build        the CUDA extension in place (setup.py build_ext --inplace; the tests and bench then
#                  include backend "cuda"); a warm machine keeps it between calls   ~2 min
#     gqa_sum      the sm90 backward's GQA dK / dV group sum by atomics against the ATen sum (after build)  ~1 min
#     sanitize     the CUDA backend under compute-sanitizer memcheck and racecheck, small shapes  ~2 min
#     mainloops    the CUDA backend's mainloops (CUDA_MAINLOOPS="wmma+wmma mma+mma sm90+mma sm90tma+mma sm90tma+sm90
#                  sm90overlap+sm90 sm90pingpong+sm90 sm90lean+sm90lean sm90lean+sm90dq",
#                  forward+backward): each pair's GPU tests in its own processes, the pairs at once (TEST_TIMEOUT
#                  per process), then one benchmark (bench_mixed_attention --cuda-mainloops, BENCH_ARGS) with a
#                  column for each pair whose fp32-reference cases all passed: a hang or a wrong result stays out
#                  of the timing  ~8 min
#     tests        GPU correctness tests (tests/test_gpu.py)          ~7 min
#     tune         tile-config sweep per head dim                      ~5 min
#     profile      CUDA time per kernel, fused vs one Flex attention (PROFILE_ARGS="--sets 4cand --cuda-mainloops
#                  mma+mma sm90tma+mma": the CUDA pairs too)   ~2 min
#     ncu          Nsight Compute on one forward+backward per NCU_METHODS entry (default: "fused cuda[sm90tma+mma]
#                  cuda[mma+mma] sdpa_cudnn", Qwen2.5-3B shape, T 4096, 4 candidates; NCU_ARGS more arguments of
#                  benchmarks/ncu_mixed_attention.py): per kernel, duration, SM and memory throughput, occupancy,
#                  registers, the main stall reasons; CSV, JSON and a table per method  ~1 min each
#     ncu_source   Nsight Compute's source view of each NCU_METHODS entry's forward kernel (default "fused
#                  cuda[sm90overlap+sm90]"): SASS and source-line CSVs (gzipped) and benchmarks/ncu_source.py's
#                  summary (instructions by opcode, the top instructions and lines)  ~1 min each
#     bench        kernel benchmark vs the baselines (issue table)     ~5 min
#     search_step  Qwen2.5-3B-shaped search step vs its floor          ~3 min
#     linear       gated linear attention / gated delta rule vs fla 0.6.0 and cuDNN (fla from carried
#                  wheels in .whl/, see the device README)                                     ~4 min
#     tune_linear  launch settings of the chunked GLA kernels, coordinate descent on the op's fwd+bwd  ~3 min
#     smollm2      the default SmolLM2 search end to end (needs MODEL=path to the GGUF, see
#                  ../shared/hooks/stage-smollm2-for-device.sh)        ~8 min
#     compare      DASH vs the selector baselines (issue 5) on SmolLM2, sharded over the GPUs
#                  (MODEL as above; COMPARE_DEVICES="cuda:0 cuda:0": a GPU named twice runs two shards;
#                  COMPARE_BUDGETS, COMPARE_ARGS). Resumable: run the part again (a warm machine keeps
#                  ~/runs/compare; a cold one restores .device-assets/compare_state.tgz, carried, which is
#                  the compare_state.tgz a previous call returned). Default: every GPU named three times
#                  (13 shards: 3 DASH searches, 3 x 3 selector groups, the bounds; SmolLM2 is host-bound)
#                  ~2 hours of shard processes at 10 samples and 1K-8K: ~20 min on 4 GPUs
#   TEST_ARGS="-x"   extra pytest arguments; TEST_K="gla and not recurrent": a pytest -k expression
#                    (note: -k fp32 matches every case id; use case ids)
#   LINEAR_ARGS="--shapes h16_d128_T4096 --modes fwd_bwd"   arguments of the linear benchmark
#   SEARCH_SHAPES="smollm2-135m"   which search-step shapes; SEARCH_ARGS="--tokens-per-step 16384" more arguments
#   *_TIMEOUT: seconds per part (TEST, BENCH, LINEAR, SEARCH; SANITIZE per tool)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (fla, einops) for the comparisons; once per machine
  [ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -m dash_kernels | tee -a "$OUT/gpu.txt"
for part in ${PARTS:-tests bench}; do
  case "$part" in
    build)
      # --force: on a warm machine the extension of an earlier call is newer than the copied sources, and setuptools
      # would skip the build, flags and all (DASH_CUDA_LINEINFO); ninja still recompiles only what changed
      MAX_JOBS="${MAX_JOBS:-16}" timeout "${BUILD_TIMEOUT:-420}" python setup.py build_ext --inplace --force \
        > "$OUT/build.log" 2>&1 \
        && echo "built: $(ls dash_kernels/_C*.so)" || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; }
      grep -E "registers|spill" "$OUT/build.log" | head -8
      python -m dash_kernels | tail -3 ;;
    gqa_sum)
      timeout "${BENCH_TIMEOUT:-120}" python benchmarks/bench_cuda_gqa_sum.py --out "$OUT/cuda_gqa_sum.json" 2>&1 \
        | grep -v Warn | tail -5 ;;
    sanitize)
      for tool in memcheck racecheck; do
        # instrument only our kernels (PyTorch's own would dominate the time); older tools lack the filter
        timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --kernel-name kns=mixed_attention \
          python benchmarks/sanitize_cuda.py > "$OUT/sanitize_$tool.log" 2>&1
        if grep -qi "unrecognized\|unknown option" "$OUT/sanitize_$tool.log"; then
          timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" python benchmarks/sanitize_cuda.py \
            > "$OUT/sanitize_$tool.log" 2>&1
        fi
        echo "$tool: exit $?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|worst" "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
      done ;;
    tests)
      timeout "${TEST_TIMEOUT:-420}" python -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py ${TEST_ARGS:-} ${TEST_K:+-k "$TEST_K"} \
        2>&1 | tee "$OUT/gpu_tests.log" | grep -E "plain|passed|failed|Error" | tail -20 ;;
    mainloops)
      pairs="${CUDA_MAINLOOPS:-wmma+wmma mma+mma sm90+mma sm90tma+mma sm90tma+sm90 sm90overlap+sm90 sm90pingpong+sm90
        sm90lean+sm90lean sm90lean+sm90dq}"
      pair_tests() {  # pair, part: reference (the fp32-reference cases, the gate of its benchmark column) or rest
        local k; [ "$2" = reference ] && k="cuda and fp32_reference" || k="cuda and not fp32_reference"
        DASH_CUDA_FWD="${1%+*}" DASH_CUDA_BWD="${1#*+}" timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -m gpu \
          -p no:cacheprovider -s tests/test_gpu.py -k "$k" > "$OUT/gpu_tests_${1/+/_}_$2.log" 2>&1
      }
      summary() { grep -E "[0-9]+ (passed|failed|error)" "$1" | tail -1; }  # pytest's counts; none: timed out
      # the reference cases one pair after the other (~10 s each; their fp32 references at T 8192 take ~25 GB a
      # process: three at once ran out of memory on an 80 GB H100), then the rest of every pair at once (~90 s)
      for pair in $pairs; do pair_tests "$pair" reference; done
      pids=()
      for pair in $pairs; do pair_tests "$pair" rest & pids+=($!); done
      wait "${pids[@]}"
      passed=()
      for pair in $pairs; do
        gate=$(summary "$OUT/gpu_tests_${pair/+/_}_reference.log") rest=$(summary "$OUT/gpu_tests_${pair/+/_}_rest.log")
        echo "$pair: reference: ${gate:-no summary (timed out)}; the rest: ${rest:-no summary (timed out)}"
        case "$gate" in *passed*) case "$gate" in *failed*|*error*) ;; *) passed+=("$pair") ;; esac ;; esac
      done
      # one log for every pair: the device returns at most 8 files from $OUT
      for pair in $pairs; do for part in reference rest; do
        echo "===== $pair $part"; cat "$OUT/gpu_tests_${pair/+/_}_$part.log"; rm -f "$OUT/gpu_tests_${pair/+/_}_$part.log"
      done; done > "$OUT/gpu_tests_mainloops.log"
      if [ ${#passed[@]} -gt 0 ]; then
        timeout "${BENCH_TIMEOUT:-330}" python benchmarks/bench_mixed_attention.py --out "$OUT/mixed_attention.json" \
          --cuda-mainloops "${passed[@]}" ${BENCH_ARGS:-} 2>&1 | grep -v Warning > "$OUT/bench.log"
        sed -n '/^GPU:/,$p' "$OUT/bench.log"
      fi ;;
    tune)
      timeout 200 python benchmarks/tune_configs.py --shape qwen2.5-3b --out "$OUT/tune_qwen.json" 2>&1 | grep "^best"
      timeout 120 python benchmarks/tune_configs.py --shape smollm2-135m --out "$OUT/tune_smol.json" 2>&1 | grep "^best" ;;
    profile)
      timeout "${PROFILE_TIMEOUT:-150}" python benchmarks/profile_kernels.py --out "$OUT/profile_qwen.json" ${PROFILE_ARGS:-} 2>&1 | grep -v Warn | tee "$OUT/profile.log" ;;
    ncu)  # the CUDA pairs need the extension: PARTS="build ncu" on a fresh machine
      set -f  # cuda[...] is a method name, not a glob
      for method in ${NCU_METHODS:-fused cuda[sm90tma+mma] cuda[mma+mma] sdpa_cudnn}; do
        name=$(echo "$method" | tr -c 'A-Za-z0-9_\n' '_')
        timeout "${NCU_TIMEOUT:-150}" ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
          --section WarpStateStats --section LaunchStats \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --csv --page details \
          python benchmarks/ncu_mixed_attention.py --method "$method" ${NCU_ARGS:-} > "$OUT/ncu_$name.csv" 2> "$OUT/ncu_$name.log"
        echo "== ncu $method (exit $?)"
        python benchmarks/ncu_mixed_attention.py --summarize "$OUT/ncu_$name.csv" --json "$OUT/ncu_$name.json" 2>&1 | tail -12
      done
      set +f ;;
    ncu_source)  # where each NCU_METHODS entry's forward issues its instructions (benchmarks/ncu_source.py); the
      # CUDA pairs need the extension built with DASH_CUDA_LINEINFO=1 for the CUDA-line view: PARTS="build ncu_source"
      set -f
      for method in ${NCU_METHODS:-fused cuda[sm90overlap+sm90]}; do
        name=$(echo "$method" | tr -c 'A-Za-z0-9_\n' '_') rep="$HOME/ncu_source_$name"
        timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none --profile-from-start off \
          --kernel-name "${NCU_KERNEL:-regex:mixed_attention_fwd|_mixed_attn_fwd}" --launch-count 1 \
          --section SourceCounters --section InstructionStats --section WarpStateStats -f -o "$rep" \
          python benchmarks/ncu_mixed_attention.py --method "$method" ${NCU_ARGS:-} >> "$OUT/ncu_source.log" 2>&1
        echo "== ncu source $method (exit $?)"
        for view in sass cuda; do
          ncu -i "$rep.ncu-rep" --page source --csv --print-source "$view" > "$HOME/${name}_$view.csv" 2>&1
          gzip -c "$HOME/${name}_$view.csv" > "$OUT/ncu_source_${name}_$view.csv.gz"
          python benchmarks/ncu_source.py "$HOME/${name}_$view.csv" $([ $view = cuda ] && echo --lines) 2>&1 | head -20
        done
        ncu -i "$rep.ncu-rep" --page details --csv 2>&1 | grep -E "Instructions|Duration|Issue" | head -12
      done 2>&1 | tee "$OUT/ncu_source_summary.log"
      set +f ;;
    bench)
      timeout "${BENCH_TIMEOUT:-330}" python benchmarks/bench_mixed_attention.py --out "$OUT/mixed_attention.json" \
        ${BENCH_ARGS:-} 2>&1 | grep -v Warning > "$OUT/bench.log"
      sed -n '/^GPU:/,$p' "$OUT/bench.log" ;;
    linear)
      timeout "${LINEAR_TIMEOUT:-300}" python benchmarks/bench_linear_attention.py --out "$OUT/linear_attention.json" \
        ${LINEAR_ARGS:-} 2>&1 | grep -v Warn | tail -14 ;;
    tune_linear)
      timeout "${LINEAR_TIMEOUT:-300}" python benchmarks/tune_linear.py --out "$OUT/tune_gla.json" 2>&1 \
        | grep -v Warn | tee "$OUT/tune_gla.log" | tail -4 ;;
    search_step)
      for shape in ${SEARCH_SHAPES:-qwen2.5-3b smollm2-135m}; do
        timeout "${SEARCH_TIMEOUT:-240}" python benchmarks/bench_search.py --shape "$shape" --profile \
          --out "$OUT/search_step_$shape${SEARCH_ARGS:+_more}.json" ${SEARCH_ARGS:-} 2>&1 | grep -v Warn | tail -40
      done ;;
    smollm2)
      timeout 540 python benchmarks/smollm2_search.py --model "${MODEL:?set MODEL to the SmolLM2 GGUF}" \
        --output "$HOME/runs/smollm2_search" --out "$OUT/smollm2_search.json" 2>&1 | tr '\r' '\n' \
        | grep -v Warn | tail -40 > "$OUT/smollm2_search.log"; tail -25 "$OUT/smollm2_search.log" ;;
    compare)
      if [ ! -d "$HOME/runs/compare" ] && [ -f .device-assets/compare_state.tgz ]; then
        mkdir -p "$HOME/runs" && tar xzf .device-assets/compare_state.tgz -C "$HOME/runs"
      fi
      devices="${COMPARE_DEVICES:-$(python -c "import torch; print(*[f'cuda:{i}' for _ in range(3) for i in range(torch.cuda.device_count())])")}"
      timeout -s INT "${COMPARE_TIMEOUT:-540}" python -m dash compare --model "${MODEL:?set MODEL to the SmolLM2 GGUF}" \
        --budgets ${COMPARE_BUDGETS:-3 6 9} --devices $devices --output "$HOME/runs/compare" ${COMPARE_ARGS:-} 2>&1 \
        | grep -v Warn > "$OUT/compare.log"
      cp "$HOME"/runs/compare/compare.json "$HOME"/runs/compare/compare.md "$HOME"/runs/compare/compare.png "$OUT"/ 2>/dev/null
      tar czf "$OUT/compare_state.tgz" -C "$HOME/runs" --exclude='*.png' compare
      tail -30 "$OUT/compare.log" ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
done
