// Host side of the CUDA forward: checks, allocation, the parameter block, and the launch per dtype and head dim.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "fwd_kernel.cuh"
#include "fwd_mma_kernel.cuh"
#include "fwd_sm90_tile.h"  // Sm90Fwd
#include "host_checks.h"

namespace dash {

#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
// fwd_sm90.cu: the Hopper mainloop (CuTe wgmma), built only where setup.py found the CUTLASS/CuTe headers
void launch_fwd_sm90(const FwdParams& params, Sm90Fwd variant, at::ScalarType dtype, int64_t head_dim, int seq,
                     int batch_heads, cudaStream_t stream);
#endif

namespace {

template <typename T, int D>
void launch(const FwdParams& params, int num_row_tiles, int batch_heads, cudaStream_t stream) {
  using Tile = FwdTile<D>;
  auto kernel = mixed_attention_fwd_kernel<T, D>;
  set_shared_memory(kernel, Tile::kSmemBytes);
  // all of the SM's unified L1/shared memory as shared, so that kMinBlocks blocks fit (a hint the driver keeps)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  kernel<<<dim3(num_row_tiles, batch_heads), Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The FlashAttention-2 style mainloop (fwd_mma_kernel.cuh): 128-row query tiles, 8 warps, one block per SM.
template <typename T, int D>
void launch_mma(const FwdParams& params, int seq, int batch_heads, cudaStream_t stream) {
  using Tile = FwdMmaTile<D>;
  auto kernel = mixed_attention_fwd_mma_kernel<T, D>;
  set_shared_memory(kernel, Tile::kSmemBytes);
  const int row_tiles = (seq + Tile::kBlockM - 1) / Tile::kBlockM;
  kernel<<<dim3(row_tiles, batch_heads), Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which forward mainloop runs: DASH_CUDA_FWD=sm90tma the Hopper one (CuTe wgmma, fwd_sm90_kernel.cuh) with K / V by
// TMA from a producer warpgroup into an mbarrier pipeline, DASH_CUDA_FWD=sm90overlap the same with each plain tile's
// softmax overlapping the previous tile's P V (FA3's IntraWGOverlap), DASH_CUDA_FWD=sm90pingpong that and the two
// consumer warpgroups taking turns to issue their products, DASH_CUDA_FWD=sm90lean sm90overlap with fewer instructions
// per tile (fwd_sm90_kernel.cuh, kLean; scale > 0), DASH_CUDA_FWD=sm90 with K / V by cp.async,
// DASH_CUDA_FWD=mma the FlashAttention-2 style one (mma.sync, everything in registers), DASH_CUDA_FWD=wmma the
// first one (fwd_kernel.cuh). Unset: the fastest measured where it runs (sm90overlap on an sm_90 GPU in a build with
// the CuTe headers: 1.56 ms against sm90tma's 1.71 at the Qwen2.5-3B shape, T 4096, 4 candidates, on an H100; else
// mma: benchmarks/NOTES.md, sessions 15 and 17). Read at every call (a getenv).
enum class FwdMainloop { kWmma, kMma, kSm90, kSm90Tma, kSm90Overlap, kSm90PingPong, kSm90Lean };
FwdMainloop forward_mainloop() {
  const char* choice = std::getenv("DASH_CUDA_FWD");
  if (choice == nullptr || *choice == '\0') {
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
    int device = c10::cuda::current_device(), major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major == 9 && minor == 0) return FwdMainloop::kSm90Overlap;
#endif
    return FwdMainloop::kMma;
  }
  if (std::strcmp(choice, "mma") == 0) return FwdMainloop::kMma;
  if (std::strcmp(choice, "sm90") == 0) return FwdMainloop::kSm90;
  if (std::strcmp(choice, "sm90tma") == 0) return FwdMainloop::kSm90Tma;
  if (std::strcmp(choice, "sm90overlap") == 0) return FwdMainloop::kSm90Overlap;
  if (std::strcmp(choice, "sm90pingpong") == 0) return FwdMainloop::kSm90PingPong;
  if (std::strcmp(choice, "sm90lean") == 0) return FwdMainloop::kSm90Lean;
  TORCH_CHECK(std::strcmp(choice, "wmma") == 0,
              "DASH_CUDA_FWD must be one of wmma, mma, sm90, sm90tma, sm90overlap, sm90pingpong, sm90lean (or unset: ",
              "the fastest that runs here), got '", choice, "'");
  return FwdMainloop::kWmma;
}

}  // namespace

// q [B, T, Hq, D], k, v [B, T, Hkv, D] (bf16 or fp16), w [Hq, C] fp32 in the plan's sorted order, windows and
// sinks sorted likewise (windows: kFullWindow for full causal). Returns (Y, O [C, B, T, Hq, D], LSE [B, Hq, C, T]
// base 2), the Triton backend's contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& w,
                                                                  c10::IntArrayRef windows, c10::IntArrayRef sinks,
                                                                  double scale) {
  const int64_t num_c = static_cast<int64_t>(windows.size());
  check_attention_inputs(q, k, v, w, num_c, kMaxCandidates);
  const int64_t head_dim = q.size(3), batch = q.size(0), seq = q.size(1), heads_q = q.size(2);

  c10::cuda::CUDAGuard guard(q.device());
  auto y = at::empty({batch, seq, heads_q, head_dim}, q.options());
  auto o = at::empty({num_c, batch, seq, heads_q, head_dim}, q.options());
  auto lse = at::empty({batch, heads_q, num_c, seq}, q.options().dtype(at::kFloat));
  const bool has_sink = std::any_of(sinks.begin(), sinks.end(), [](int64_t s) { return s > 0; });
  at::Tensor sink_o, sink_lse;
  if (has_sink) {
    sink_o = at::empty({num_c, batch, seq, heads_q, head_dim}, q.options().dtype(at::kFloat));
    sink_lse = at::empty_like(lse);
  }

  FwdParams params{};
  fill_attention_params(params, q, k, v, num_c);
  params.w = w.data_ptr<float>();
  params.y = y.data_ptr();
  params.o = o.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.sink_o = has_sink ? sink_o.data_ptr<float>() : nullptr;
  params.sink_lse = has_sink ? sink_lse.data_ptr<float>() : nullptr;
  const std::vector<int> edges = band_edges(windows, sinks, params.has_full);
  for (int64_t c = 0; c < num_c; ++c) {
    params.windows[c] = static_cast<int>(windows[c]);
    params.sinks[c] = static_cast<int>(sinks[c]);
  }
  params.num_edges = static_cast<int>(edges.size());
  std::copy(edges.begin(), edges.end(), params.edges);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int row_tiles = static_cast<int>((seq + 63) / 64);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int bh = static_cast<int>(batch * heads_q);
  const FwdMainloop mainloop = forward_mainloop();
  if (mainloop == FwdMainloop::kSm90 || mainloop == FwdMainloop::kSm90Tma || mainloop == FwdMainloop::kSm90Overlap ||
      mainloop == FwdMainloop::kSm90PingPong || mainloop == FwdMainloop::kSm90Lean) {
    // the lean walk takes each row's max on the raw scores, then scales it: the same max only for scale > 0
    TORCH_CHECK(mainloop != FwdMainloop::kSm90Lean || (std::isfinite(scale) && scale > 0),
                "DASH_CUDA_FWD=sm90lean takes a scale > 0, got ", scale, " (sm90overlap takes any finite scale)");
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
    const Sm90Fwd variant = mainloop == FwdMainloop::kSm90           ? Sm90Fwd::kCpAsync
                            : mainloop == FwdMainloop::kSm90Tma      ? Sm90Fwd::kTma
                            : mainloop == FwdMainloop::kSm90Overlap  ? Sm90Fwd::kTmaOverlap
                            : mainloop == FwdMainloop::kSm90PingPong ? Sm90Fwd::kTmaPingPong
                                                                     : Sm90Fwd::kTmaLean;
    launch_fwd_sm90(params, variant, q.scalar_type(), head_dim, static_cast<int>(seq), bh, stream);
#else
    TORCH_CHECK(false,
                "DASH_CUDA_FWD=sm90 / sm90tma / sm90overlap / sm90pingpong / sm90lean: this build of dash_kernels._C has no Hopper forward: it was compiled without "
                "the CUTLASS/CuTe headers (cute/tensor.hpp). `pip install nvidia-cutlass` (or set CUTLASS_INCLUDE to "
                "CUTLASS's include/) and rebuild for architecture 9.0; or unset DASH_CUDA_FWD");
#endif
    return {y, o, lse};
  }
  dispatch_dtype_and_head_dim(q.scalar_type(), head_dim, [&](auto type, auto dim) {
    if (mainloop == FwdMainloop::kMma)
      launch_mma<decltype(type), decltype(dim)::value>(params, static_cast<int>(seq), bh, stream);
    else launch<decltype(type), decltype(dim)::value>(params, row_tiles, bh, stream);
  });
  return {y, o, lse};
}

}  // namespace dash
