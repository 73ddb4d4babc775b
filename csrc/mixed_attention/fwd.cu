// Host side of the CUDA forward: checks, allocation, the parameter block, and the launch per dtype and head dim.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "fwd_kernel.cuh"
#include "host_checks.h"

namespace dash {

namespace {

template <typename T, int D>
void launch(const FwdParams& params, int num_row_tiles, int batch_heads, cudaStream_t stream) {
  using Tile = FwdTile<D>;
  auto kernel = mixed_attention_fwd_kernel<T, D>;
  set_shared_memory(kernel, Tile::kSmemBytes);
  kernel<<<dim3(num_row_tiles, batch_heads), Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(static_cast<int64_t>(sinks.size()) == num_c, "one sink per window");
  const int64_t head_dim = q.size(3), batch = q.size(0), seq = q.size(1), heads_q = q.size(2), heads_kv = k.size(2);

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
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.w = w.data_ptr<float>();
  params.y = y.data_ptr();
  params.o = o.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.sink_o = has_sink ? sink_o.data_ptr<float>() : nullptr;
  params.sink_lse = has_sink ? sink_lse.data_ptr<float>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    params.q_stride[i] = q.stride(i);
    params.k_stride[i] = k.stride(i);
    params.v_stride[i] = v.stride(i);
  }
  params.batch = static_cast<int>(batch);
  params.seq = static_cast<int>(seq);
  params.heads_q = static_cast<int>(heads_q);
  params.group = static_cast<int>(heads_q / heads_kv);
  params.num_c = static_cast<int>(num_c);
  std::vector<int> edges;
  for (int64_t c = 0; c < num_c; ++c) {
    const int64_t window = windows[c];
    TORCH_CHECK(window >= 1 && window <= kFullWindow, "windows[", c, "] must be in [1, 2^30], got ", window);
    TORCH_CHECK(c == 0 || window >= windows[c - 1], "windows must come sorted ascending (the plan's order)");
    TORCH_CHECK(sinks[c] >= 0 && (sinks[c] == 0 || window < kFullWindow), "sinks[", c, "] invalid: ", sinks[c]);
    params.windows[c] = static_cast<int>(window);
    params.sinks[c] = static_cast<int>(sinks[c]);
    if (window < kFullWindow) {
      if (edges.empty() || edges.back() != window) edges.push_back(static_cast<int>(window));
    } else {
      params.has_full = 1;
    }
  }
  params.num_edges = static_cast<int>(edges.size());
  std::copy(edges.begin(), edges.end(), params.edges);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int row_tiles = static_cast<int>((seq + 63) / 64);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int bh = static_cast<int>(batch * heads_q);
  if (q.scalar_type() == at::kBFloat16) {
    if (head_dim == 64) launch<__nv_bfloat16, 64>(params, row_tiles, bh, stream);
    else launch<__nv_bfloat16, 128>(params, row_tiles, bh, stream);
  } else {
    if (head_dim == 64) launch<__half, 64>(params, row_tiles, bh, stream);
    else launch<__half, 128>(params, row_tiles, bh, stream);
  }
  return {y, o, lse};
}

}  // namespace dash
