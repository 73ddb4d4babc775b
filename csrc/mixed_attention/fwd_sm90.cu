// Launcher of the Hopper forward (fwd_sm90_kernel.cuh, DASH_CUDA_FWD=sm90). Its own translation unit, so that only
// it includes the CuTe headers; empty unless setup.py found them (DASH_WITH_SM90_CUTE=1, see setup.py).
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include "fwd_sm90_kernel.cuh"
#include "host_checks.h"

namespace dash {

namespace {

template <typename T, int D>
void launch_sm90(const FwdParams& params, int seq, int batch_heads, cudaStream_t stream) {
  using Tile = FwdSm90Tile<D>;
  auto kernel = mixed_attention_fwd_sm90_kernel<T, D>;
  set_shared_memory(kernel, Tile::kSmemBytes);
  const int row_tiles = (seq + Tile::kBlockM - 1) / Tile::kBlockM;
  kernel<<<dim3(row_tiles, batch_heads), Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Called by fwd.cu for DASH_CUDA_FWD=sm90 (inputs checked, params filled there).
void launch_fwd_sm90(const FwdParams& params, at::ScalarType dtype, int64_t head_dim, int seq, int batch_heads,
                     cudaStream_t stream) {
  int device = c10::cuda::current_device(), major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "DASH_CUDA_FWD=sm90 needs a Hopper GPU (sm_90a: wgmma); this one is sm_",
              major, minor, ". Unset DASH_CUDA_FWD or use DASH_CUDA_FWD=mma");
  dispatch_dtype_and_head_dim(dtype, head_dim, [&](auto type, auto dim) {
    launch_sm90<decltype(type), decltype(dim)::value>(params, seq, batch_heads, stream);
  });
}

}  // namespace dash

#endif  // DASH_WITH_SM90_CUTE
