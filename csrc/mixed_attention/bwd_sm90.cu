// Launcher of the Hopper backward (bwd_sm90_kernel.cuh, DASH_CUDA_BWD=sm90). Its own translation unit, so that only
// it (and fwd_sm90.cu) includes the CuTe headers; empty unless setup.py found them (DASH_WITH_SM90_CUTE=1).
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include "bwd_sm90_kernel.cuh"
#include "host_checks.h"

namespace dash {

namespace {

template <typename T, int D>
void launch_bwd_sm90_kernel(const BwdMmaParams& params, Sm90Bwd variant, int batch_heads, cudaStream_t stream) {
  using Tile = BwdSm90Tile<D>;
  using Tr = sm90::BwdTraits<T, D>;
  using E = typename Tr::Element;
  const int heads_kv = params.heads_q / params.group;
  // Q, K, V with their own strides (checked 16-byte aligned by check_head_tensor); dY contiguous [B, T, Hq, D]
  const int64_t dy_st = int64_t(params.heads_q) * D, dy_sb = int64_t(params.seq) * dy_st;
  const auto tma_q = Tr::make_tma_q(static_cast<const E*>(params.q), params.seq, params.heads_q, params.batch,
                                    params.q_stride[1], params.q_stride[2], params.q_stride[0]);
  const auto tma_dy = Tr::make_tma_q(static_cast<const E*>(params.dy), params.seq, params.heads_q, params.batch, dy_st,
                                     D, dy_sb);
  const auto tma_k = Tr::make_tma_k(static_cast<const E*>(params.k), params.seq, heads_kv, params.batch,
                                    params.k_stride[1], params.k_stride[2], params.k_stride[0]);
  const auto tma_v = Tr::make_tma_k(static_cast<const E*>(params.v), params.seq, heads_kv, params.batch,
                                    params.v_stride[1], params.v_stride[2], params.v_stride[0]);
  using TmaQ = typename Tr::TmaQ;
  using TmaK = typename Tr::TmaK;
  const size_t bytes = Tile::smem_bytes(params.num_regions, variant == Sm90Bwd::kLeanDqBulk);
  auto kernel = variant == Sm90Bwd::kLeanDqBulk ? mixed_attention_bwd_sm90_kernel<T, D, true, true, TmaQ, TmaK>
                : variant == Sm90Bwd::kLean     ? mixed_attention_bwd_sm90_kernel<T, D, true, false, TmaQ, TmaK>
                                                : mixed_attention_bwd_sm90_kernel<T, D, false, false, TmaQ, TmaK>;
  set_shared_memory(kernel, bytes);
  const dim3 grid((params.seq + Tile::kBlockN - 1) / Tile::kBlockN, batch_heads);
  kernel<<<grid, Tile::kThreads, bytes, stream>>>(params, tma_q, tma_dy, tma_k, tma_v);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Called by bwd.cu for DASH_CUDA_BWD=sm90 / sm90lean / sm90dq (the variant) after the prep kernel (inputs checked,
// params filled, dq_accum zeroed there; the device checked to be sm_90 and the shared memory to fit by bwd.cu's
// backward_mainloop).
void launch_bwd_sm90(const BwdMmaParams& params, Sm90Bwd variant, at::ScalarType dtype, int64_t head_dim,
                     int batch_heads, cudaStream_t stream) {
  dispatch_dtype_and_head_dim(dtype, head_dim, [&](auto type, auto dim) {
    launch_bwd_sm90_kernel<decltype(type), decltype(dim)::value>(params, variant, batch_heads, stream);
  });
}

}  // namespace dash

#endif  // DASH_WITH_SM90_CUTE
