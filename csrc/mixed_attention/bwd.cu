// Host side of the CUDA backward: the region table, the three launches, the GQA group sums.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "bwd_kernel.cuh"
#include "bwd_mma_kernel.cuh"
#include "bwd_sm90_tile.h"
#include "fwd_mma_kernel.cuh"
#include "fwd_sm90_tile.h"
#include "host_checks.h"

namespace dash {

#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
// bwd_sm90.cu: the Hopper backward mainloop (CuTe wgmma), built only where setup.py found the CUTLASS/CuTe headers
void launch_bwd_sm90(const BwdMmaParams& params, Sm90Bwd variant, at::ScalarType dtype, int64_t head_dim,
                     int batch_heads, cudaStream_t stream);
#endif

namespace {

template <typename T>
void launch_prep(const BwdParams& params, int head_dim, int batch_heads, cudaStream_t stream) {
  const dim3 grid((params.seq + kPrepRows - 1) / kPrepRows, batch_heads);
  mixed_attention_bwd_prep_kernel<T><<<grid, 128, 0, stream>>>(params, head_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_bwd(const BwdParams& params, int row_tiles, int batch_heads, cudaStream_t stream) {
  using Tile = BwdTile<D>;
  const dim3 grid(row_tiles, batch_heads);
  launch_prep<T>(params, D, batch_heads, stream);
  auto dkdv = mixed_attention_bwd_dkdv_kernel<T, D>;
  set_shared_memory(dkdv, Tile::kSmemBytes);
  dkdv<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto dq = mixed_attention_bwd_dq_kernel<T, D>;
  set_shared_memory(dq, Tile::kSmemBytesDq);
  dq<<<grid, Tile::kThreads, Tile::kSmemBytesDq, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The FlashAttention-2 style backward (bwd_mma_kernel.cuh): the same prep, then one kernel for dK/dV (128-key
// tiles, 8 warps) that also adds dQ (pre-scaled) into the zeroed fp32 ``dq_accum`` by atomics.
template <typename T, int D>
void launch_bwd_mma(const BwdParams& params, float* dq_accum, int batch_heads, cudaStream_t stream) {
  using Tile = BwdMmaTile<D>;
  launch_prep<T>(params, D, batch_heads, stream);
  BwdMmaParams mma_params{};
  static_cast<BwdParams&>(mma_params) = params;
  mma_params.dq_accum = dq_accum;
  const size_t bytes = Tile::smem_bytes(params.num_regions);
  auto kernel = mixed_attention_bwd_dkdv_mma_kernel<T, D>;
  set_shared_memory(kernel, bytes);
  const dim3 grid((params.seq + Tile::kBlockN - 1) / Tile::kBlockN, batch_heads);
  kernel<<<grid, Tile::kThreads, bytes, stream>>>(mma_params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Hopper backward (bwd_sm90_kernel.cuh): the same prep, then one kernel (128-key tiles, a TMA producer
// warpgroup and 2 wgmma warpgroups) that adds dQ (pre-scaled) into the zeroed fp32 ``dq_accum`` by atomics and
// writes dK / dV per query head like the mma one.
template <typename T, int D>
void launch_bwd_wgmma(const BwdParams& params, Sm90Bwd variant, float* dq_accum, float* dk_accum, float* dv_accum,
                      at::ScalarType dtype, int batch_heads, cudaStream_t stream) {
  launch_prep<T>(params, D, batch_heads, stream);
  BwdMmaParams mma_params{};
  static_cast<BwdParams&>(mma_params) = params;
  mma_params.dq_accum = dq_accum;
  mma_params.dk_accum = dk_accum;
  mma_params.dv_accum = dv_accum;
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
  launch_bwd_sm90(mma_params, variant, dtype, D, batch_heads, stream);
#else
  (void)dtype;
  (void)variant;
  TORCH_CHECK(false, "unreachable: backward_mainloop refuses DASH_CUDA_BWD=sm90 without the CuTe headers");
#endif
}

enum class BwdMainloop { kWmma, kMma, kSm90 };

// Does the mma backward's shared memory (which grows with the region count) fit this device? Where it does not,
// the wmma one runs, with a warning (once): whoever set the variable is timing or testing the mma one and must
// know it did not run.
bool mma_backward_fits(int64_t head_dim, int num_regions, int limit, const char* asked) {
  const size_t bytes =
      head_dim == 64 ? BwdMmaTile<64>::smem_bytes(num_regions) : BwdMmaTile<128>::smem_bytes(num_regions);
  if (bytes <= static_cast<size_t>(limit)) return true;
  if (*asked == '\0') return false;  // the default choice falls back silently
  TORCH_WARN_ONCE("DASH_CUDA_BWD=", asked, ": ", num_regions, " candidate regions need ", bytes,
                  " bytes of shared memory a block in the mma backward, over this GPU's ", limit,
                  "; the wmma backward runs instead");
  return false;
}

// Which backward mainloop runs: DASH_CUDA_BWD=mma the FlashAttention-2 style one, DASH_CUDA_BWD=sm90 the Hopper
// one (CuTe wgmma, bwd_sm90_kernel.cuh), DASH_CUDA_BWD=sm90lean that with fewer instructions a step (kLean there),
// DASH_CUDA_BWD=sm90dq that and dQ by bulk reduce-add instead of atomics (kDqBulk; 35 KB more shared memory),
// DASH_CUDA_BWD=wmma the first one (bwd_kernel.cuh). Unset: the fastest
// measured where it runs (sm90 on an sm_90 GPU in a build with the CuTe headers, else mma; each falls back as below
// where its shared memory does not fit: benchmarks/NOTES.md, session 15). Read at every call (a getenv). sm90
// needs the CuTe headers at build time and an sm_90 device (else an error, as for DASH_CUDA_FWD=sm90), and its shared memory (3 R 64 floats a stage of coefficients) to fit the device: where it
// does not, the mma one runs (or, where that does not fit either, the wmma one), with a warning (once).
// ``variant``: which Hopper backward, where kSm90 is returned (sm90, sm90lean, sm90dq).
BwdMainloop backward_mainloop(int64_t head_dim, int num_regions, Sm90Bwd& variant) {
  const char* choice = std::getenv("DASH_CUDA_BWD");
  const bool unset = choice == nullptr || *choice == '\0';
  if (unset) choice = "";
  const bool dq_bulk = std::strcmp(choice, "sm90dq") == 0;
  const bool lean = dq_bulk || std::strcmp(choice, "sm90lean") == 0;
  variant = dq_bulk ? Sm90Bwd::kLeanDqBulk : lean ? Sm90Bwd::kLean : Sm90Bwd::kPlain;
  if (!unset && !lean && std::strcmp(choice, "sm90") != 0 && std::strcmp(choice, "mma") != 0) {
    TORCH_CHECK(std::strcmp(choice, "wmma") == 0, "DASH_CUDA_BWD must be one of wmma, mma, sm90, sm90lean, sm90dq "
                "(or unset: the fastest that runs here), got '", choice, "'");
    return BwdMainloop::kWmma;
  }
  int device = c10::cuda::current_device(), limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  bool sm90 = lean || std::strcmp(choice, "sm90") == 0;
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
  if (unset) {  // the default: the Hopper backward where the device is sm_90
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    sm90 = major == 9 && minor == 0;
  }
#endif
  if (sm90) {
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    TORCH_CHECK(major == 9 && minor == 0, "DASH_CUDA_BWD=", unset ? "sm90" : choice,
                " needs a Hopper GPU (sm_90a: wgmma); this one is sm_", major, minor,
                ". Unset DASH_CUDA_BWD or use DASH_CUDA_BWD=mma");
    const size_t bytes = head_dim == 64 ? BwdSm90Tile<64>::smem_bytes(num_regions, dq_bulk)
                                        : BwdSm90Tile<128>::smem_bytes(num_regions, dq_bulk);
    if (bytes <= static_cast<size_t>(limit)) return BwdMainloop::kSm90;
    if (!unset) TORCH_WARN_ONCE("DASH_CUDA_BWD=", choice, ": ", num_regions, " candidate regions need ", bytes,
                    " bytes of shared memory a block in the sm90 backward, over this GPU's ", limit,
                    "; the mma backward runs instead");
#else
    TORCH_CHECK(false,
                "DASH_CUDA_BWD=sm90 / sm90lean / sm90dq: this build of dash_kernels._C has no Hopper backward: it was "
                "compiled without the CUTLASS/CuTe headers (cute/tensor.hpp). `pip install nvidia-cutlass` (or set CUTLASS_INCLUDE to "
                "CUTLASS's include/) and rebuild for architecture 9.0; or unset DASH_CUDA_BWD");
#endif
  }
  return mma_backward_fits(head_dim, num_regions, limit, choice) ? BwdMainloop::kMma : BwdMainloop::kWmma;
}

}  // namespace

// dy [B, T, Hq, D]; q, k, v, w, windows, sinks as for the forward; o, lse the forward's. Returns (dq, dk, dv,
// delta [B, Hq, C, T]) like the Triton backward (dw = delta summed over batch and tokens, by the caller).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_attention_bwd(
    const at::Tensor& dy_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& o_in, const at::Tensor& lse_in, c10::IntArrayRef windows, c10::IntArrayRef sinks,
    double scale) {
  const int64_t num_c = static_cast<int64_t>(windows.size());
  check_attention_inputs(q, k, v, w, num_c, kMaxCandidates);
  const int64_t batch = q.size(0), seq = q.size(1), heads_q = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(2);
  TORCH_CHECK(dy_in.sizes() == q.sizes() && dy_in.device() == q.device(), "dy must have q's shape and device");
  TORCH_CHECK(o_in.sizes() == at::IntArrayRef({num_c, batch, seq, heads_q, head_dim}) &&
                  o_in.scalar_type() == q.scalar_type() && o_in.device() == q.device(),
              "o must be the forward's [C, B, T, Hq, D] output in q's dtype");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({batch, heads_q, num_c, seq}) && lse_in.scalar_type() == at::kFloat &&
                  lse_in.device() == q.device(),
              "lse must be the forward's [B, Hq, C, T] float32 output");
  c10::cuda::CUDAGuard guard(q.device());
  auto dy = dy_in.to(q.scalar_type()).contiguous();
  if (reinterpret_cast<uintptr_t>(dy.data_ptr()) % 16 != 0) dy = dy.clone();  // a view at an odd offset
  const auto o = o_in.contiguous();
  const auto lse = lse_in.contiguous();

  BwdParams params{};
  const std::vector<int> bands = band_edges(windows, sinks, params.has_full);
  std::vector<int> sink_edges;
  for (int64_t c = 0; c < num_c; ++c)
    if (sinks[c] > 0) sink_edges.push_back(static_cast<int>(sinks[c]));
  std::sort(sink_edges.begin(), sink_edges.end());
  sink_edges.erase(std::unique(sink_edges.begin(), sink_edges.end()), sink_edges.end());
  const int nb = static_cast<int>(bands.size()), ns = static_cast<int>(sink_edges.size());
  const int num_regions = (nb + 1) * (ns + 1);
  // the membership table of spec._plan: region (band, level) is seen by candidate c iff its window reaches past
  // the band's smallest distance, or its sink covers the level's keys
  for (int band = 0; band <= nb; ++band) {
    const int64_t band_lo = band == 0 ? 0 : bands[band - 1];
    for (int level = 0; level <= ns; ++level) {
      const int64_t sink_hi = level == 0 ? 0 : sink_edges[ns - level];
      int bits = 0;
      for (int64_t c = 0; c < num_c; ++c)
        if (windows[c] > band_lo || (sink_hi > 0 && sinks[c] >= sink_hi)) bits |= 1 << c;
      params.membership[band * (ns + 1) + level] = bits;
    }
  }
  std::copy(bands.begin(), bands.end(), params.band_edges);
  std::copy(sink_edges.begin(), sink_edges.end(), params.sink_edges);
  params.num_bands = nb;
  params.num_sinks = ns;
  params.num_regions = num_regions;
  params.widest = nb ? bands.back() : 1;
  params.max_sink = ns ? sink_edges.back() : 0;

  auto f32 = q.options().dtype(at::kFloat);
  auto delta = at::empty({batch, heads_q, num_c, seq}, f32);
  auto ref = at::empty({batch, heads_q, num_regions, seq}, f32);
  auto coef_a = at::empty_like(ref), coef_b = at::empty_like(ref);
  Sm90Bwd sm90_variant = Sm90Bwd::kPlain;
  const BwdMainloop mainloop = backward_mainloop(head_dim, num_regions, sm90_variant);
  // the mma and sm90 backwards add dQ into a zeroed fp32 buffer (converted below); the wmma one writes dq directly
  const bool use_mma = mainloop != BwdMainloop::kWmma;
  auto dq = use_mma ? at::zeros({batch, seq, heads_q, head_dim}, f32)
                    : at::empty({batch, seq, heads_q, head_dim}, q.options());
  const int64_t group = heads_q / heads_kv;
  // dK / dV in fp32: the sm90 backward adds a GQA group's query heads into [B, T, Hkv, D] by atomics; the others
  // write them per query head, summed per group below (DASH_CUDA_GQA_SUM=aten: that for the sm90 one too, the
  // baseline of benchmarks/bench_cuda_gqa_sum.py)
  const char* gqa_sum = std::getenv("DASH_CUDA_GQA_SUM");
  const bool kv_accum =
      mainloop == BwdMainloop::kSm90 && group > 1 && !(gqa_sum && std::strcmp(gqa_sum, "aten") == 0);
  auto dk = kv_accum ? at::zeros({batch, seq, heads_kv, head_dim}, f32)
                     : at::empty({batch, seq, heads_q, head_dim}, f32);
  auto dv = kv_accum ? at::zeros_like(dk) : at::empty_like(dk);

  fill_attention_params(params, q, k, v, num_c);
  params.dy = dy.data_ptr();
  params.o = o.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.w = w.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.ref = ref.data_ptr<float>();
  params.coef_a = coef_a.data_ptr<float>();
  params.coef_b = coef_b.data_ptr<float>();
  params.dq = use_mma ? nullptr : dq.data_ptr();
  params.dk = dk.data_ptr<float>();
  params.dv = dv.data_ptr<float>();
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int row_tiles = static_cast<int>((seq + 63) / 64), bh = static_cast<int>(batch * heads_q);
  dispatch_dtype_and_head_dim(q.scalar_type(), head_dim, [&](auto type, auto dim) {
    if (mainloop == BwdMainloop::kSm90)
      launch_bwd_wgmma<decltype(type), decltype(dim)::value>(params, sm90_variant, dq.data_ptr<float>(),
                                                             kv_accum ? dk.data_ptr<float>() : nullptr,
                                                             kv_accum ? dv.data_ptr<float>() : nullptr,
                                                             q.scalar_type(), bh, stream);
    else if (use_mma) launch_bwd_mma<decltype(type), decltype(dim)::value>(params, dq.data_ptr<float>(), bh, stream);
    else launch_bwd<decltype(type), decltype(dim)::value>(params, row_tiles, bh, stream);
  });
  if (use_mma) dq = dq.to(q.scalar_type());
  auto dk_out = (kv_accum ? dk : dk.view({batch, seq, heads_kv, group, head_dim}).sum(3)).to(k.scalar_type());
  auto dv_out = (kv_accum ? dv : dv.view({batch, seq, heads_kv, group, head_dim}).sum(3)).to(v.scalar_type());
  return {dq, dk_out, dv_out, delta};
}

// The Hopper forward's bytes (its TMA variant, the larger by the pipeline barriers) where it is built
// (DASH_WITH_SM90_CUTE), else 0 (it cannot run).
constexpr size_t sm90_bytes(size_t bytes) {
#if defined(DASH_WITH_SM90_CUTE) && DASH_WITH_SM90_CUTE
  return bytes;
#else
  return bytes * 0;
#endif
}

// The most dynamic shared memory a block of the forward (any built mainloop, whichever DASH_CUDA_FWD selects) or
// the backward takes at this head dim (the Python side compares it with the device's per-block limit before
// choosing this backend).
int64_t shared_memory_bytes(int64_t head_dim) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "the CUDA backend supports head dims 64 and 128, got ", head_dim);
  return head_dim == 64
             ? std::max({FwdTile<64>::kSmemBytes, FwdMmaTile<64>::kSmemBytes,
                         sm90_bytes(FwdSm90Tile<64>::kSmemBytesTma), BwdTile<64>::kSmemBytes})
             : std::max({FwdTile<128>::kSmemBytes, FwdMmaTile<128>::kSmemBytes,
                         sm90_bytes(FwdSm90Tile<128>::kSmemBytesTma), BwdTile<128>::kSmemBytes});
}

}  // namespace dash
