#!/usr/bin/env bash
# Compiles every csrc/ translation unit for sm_90a without a GPU or a CUDA build of torch installed: the headers
# come from a CUDA torch wheel (TORCH_WHEEL, unpacked once), nvcc from the machine. The quick check while
# editing (CI builds and loads the whole extension instead), with ptxas's register and spill report.
# Usage: TORCH_WHEEL=/path/torch-*.whl [CUTLASS_INCLUDE=/path/cutlass/include] csrc/compile_check.sh
# With CUTLASS_INCLUDE (the directory holding cute/, e.g. the nvidia-cutlass wheel's
# cutlass_library/source/include) the Hopper forward and backward (fwd_sm90.cu, bwd_sm90.cu) are compiled too, as
# setup.py does when it finds the headers; without it those files compile to nothing (DASH_WITH_SM90_CUTE unset).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wheel="${TORCH_WHEEL:?set TORCH_WHEEL to a CUDA build of torch (.whl) for its headers}"
work="${WORK:-$(mktemp -d)}"
if [ ! -d "$work/torch/include" ]; then
  unzip -q -o "$wheel" 'torch/include/*' -d "$work"
fi
inc="$work/torch/include"
py_inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
flags=(-std=c++20 -O3 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
       -I"$inc" -I"$inc/torch/csrc/api/include" -I"$py_inc" -I"$here")
if [ -n "${CUTLASS_INCLUDE:-}" ]; then
  [ -f "$CUTLASS_INCLUDE/cute/tensor.hpp" ] || { echo "CUTLASS_INCLUDE=$CUTLASS_INCLUDE has no cute/tensor.hpp" >&2; exit 1; }
  flags+=(-I"$CUTLASS_INCLUDE" -DDASH_WITH_SM90_CUTE=1)
  echo "with the CuTe headers in $CUTLASS_INCLUDE: the sm90 forward and backward are compiled"
else
  echo "no CUTLASS_INCLUDE: the sm90 forward and backward (fwd_sm90.cu, bwd_sm90.cu) compile to nothing"
fi
# what torch.utils.cpp_extension adds to every nvcc call, so that this check compiles what setup.py compiles
torch_nvcc=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options "'-fPIC'")
jobs=()
for src in $(find "$here" -name '*.cu' | sort); do
  echo "nvcc $src"
  nvcc "${flags[@]}" "${torch_nvcc[@]}" -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
    -c "$src" -o "$work/$(basename "$src").o" 2> "$work/$(basename "$src").log" &
  jobs+=("$!:$src")
done
for src in $(find "$here" -name '*.cpp' | sort); do
  echo "g++ $src"
  g++ "${flags[@]}" -fPIC -c "$src" -o "$work/$(basename "$src").o"
done
status=0
for job in "${jobs[@]}"; do
  pid="${job%%:*}"; src="${job#*:}"
  if ! wait "$pid"; then status=1; echo "FAILED: $src"; fi
  grep -E "error|registers|spill" "$work/$(basename "$src").log" | grep -v "^$" | head -20 || true
done
[ "$status" = 0 ] && echo "csrc compiles for sm_90a"
exit "$status"
