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
void launch_sm90(const FwdParams& params, Sm90Fwd variant, int seq, int batch_heads, cudaStream_t stream) {
  using Tile = FwdSm90Tile<D>;
  using Tr = sm90::Traits<T, D>;
  using E = typename Tr::Element;
  const dim3 grid((seq + Tile::kBlockM - 1) / Tile::kBlockM, batch_heads);
  if (variant == Sm90Fwd::kCpAsync) {
    auto kernel = mixed_attention_fwd_sm90_kernel<T, D, false, false, false, false, sm90::NoTma, sm90::NoTma>;
    set_shared_memory(kernel, Tile::kSmemBytes);
    kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params, sm90::NoTma{}, sm90::NoTma{});
  } else {
    // K, V as whole [B, T, Hkv, D] tensors (the block picks its batch and KV head by coordinates)
    const int heads_kv = params.heads_q / params.group;
    const auto tma_k = Tr::make_tma_k(static_cast<const E*>(params.k), seq, heads_kv, params.batch, params.k_stride[1],
                                      params.k_stride[2], params.k_stride[0]);
    const auto tma_v = Tr::make_tma_v(static_cast<const E*>(params.v), seq, heads_kv, params.batch, params.v_stride[1],
                                      params.v_stride[2], params.v_stride[0]);
    using TmaK = typename Tr::TmaK;
    using TmaV = typename Tr::TmaV;
    auto kernel =
        variant == Sm90Fwd::kTmaLean       ? mixed_attention_fwd_sm90_kernel<T, D, true, true, false, true, TmaK, TmaV>
        : variant == Sm90Fwd::kTmaPingPong ? mixed_attention_fwd_sm90_kernel<T, D, true, true, true, false, TmaK, TmaV>
        : variant == Sm90Fwd::kTmaOverlap  ? mixed_attention_fwd_sm90_kernel<T, D, true, true, false, false, TmaK, TmaV>
                                           : mixed_attention_fwd_sm90_kernel<T, D, true, false, false, false, TmaK, TmaV>;
    set_shared_memory(kernel, Tile::kSmemBytesTma);
    kernel<<<grid, Tile::kThreadsTma, Tile::kSmemBytesTma, stream>>>(params, tma_k, tma_v);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Called by fwd.cu for DASH_CUDA_FWD=sm90 / sm90tma / sm90overlap / sm90pingpong / sm90lean (inputs checked, params filled there; the
// variants: fwd_sm90_tile.h, Sm90Fwd).
void launch_fwd_sm90(const FwdParams& params, Sm90Fwd variant, at::ScalarType dtype, int64_t head_dim, int seq,
                     int batch_heads, cudaStream_t stream) {
  int device = c10::cuda::current_device(), major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "DASH_CUDA_FWD=sm90 / sm90tma / sm90overlap / sm90pingpong / sm90lean needs a Hopper GPU (sm_90a: wgmma); this one is sm_",
              major, minor, ". Unset DASH_CUDA_FWD or use DASH_CUDA_FWD=mma");
  dispatch_dtype_and_head_dim(dtype, head_dim, [&](auto type, auto dim) {
    launch_sm90<decltype(type), decltype(dim)::value>(params, variant, seq, batch_heads, stream);
  });
}

}  // namespace dash

#endif  // DASH_WITH_SM90_CUTE
