// Host-side argument checks and launch helpers shared by the forward and backward launchers.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fwd_kernel.cuh"

namespace dash {

// q, k, v (and dy): [B, T, H, D] CUDA tensors whose rows the kernels read as 16-byte chunks.
inline void check_head_tensor(const at::Tensor& x, const char* name, int64_t head_dim) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, name, " must be [B, T, H, D], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(3) == head_dim, name, " has head dim ", x.size(3), ", expected ", head_dim);
  TORCH_CHECK(x.stride(3) == 1, name, " must be contiguous in its last (head) dim, got stride ", x.stride(3));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
                  x.stride(2) % 8 == 0,
              name, " rows must be 16-byte aligned (strides multiples of 8 elements)");
}

// q [B, T, Hq, D], k, v [B, T, Hkv, D], w [Hq, C]: the checks both directions need.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                   int64_t num_c, int max_candidates) {
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "the CUDA backend supports head dims 64 and 128, got ", head_dim);
  check_head_tensor(q, "q", head_dim);
  check_head_tensor(k, "k", head_dim);
  check_head_tensor(v, "v", head_dim);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "the CUDA backend supports bfloat16 and float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && w.device() == q.device(),
              "q, k, v and w must be on one device");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), "k and v must match q in batch and length");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "Hq (", q.size(2), ") must be a multiple of Hkv (",
              k.size(2), ")");
  TORCH_CHECK(q.size(0) >= 1 && q.size(1) >= 1, "empty inputs");
  TORCH_CHECK(q.size(1) < (int64_t(1) << 30), "sequence too long");
  TORCH_CHECK(q.size(0) * q.size(2) <= 65535, "B * Hq must be <= 65535 for the CUDA backend, got ",
              q.size(0) * q.size(2));
  TORCH_CHECK(num_c >= 1 && num_c <= max_candidates, "the CUDA backend takes 1 to ", max_candidates,
              " candidates, got ", num_c);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == q.size(2) && w.size(1) == num_c &&
                  w.is_contiguous(),
              "w must be a contiguous [Hq, C] float32 tensor");
}

// The q, k, v part of either direction's parameter block (after check_attention_inputs).
inline void fill_attention_params(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  int64_t num_c) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = static_cast<int>(q.size(0));
  p.seq = static_cast<int>(q.size(1));
  p.heads_q = static_cast<int>(q.size(2));
  p.group = static_cast<int>(q.size(2) / k.size(2));
  p.num_c = static_cast<int>(num_c);
}

// The plan's sorted windows (kFullWindow: full causal) and sinks, checked; returns the band edges (distinct
// finite windows, ascending) and sets ``has_full``.
inline std::vector<int> band_edges(c10::IntArrayRef windows, c10::IntArrayRef sinks, int& has_full) {
  TORCH_CHECK(sinks.size() == windows.size(), "one sink per window");
  std::vector<int> edges;
  has_full = 0;
  for (size_t c = 0; c < windows.size(); ++c) {
    const int64_t window = windows[c];
    TORCH_CHECK(window >= 1 && window <= kFullWindow, "windows[", c, "] must be in [1, 2^30], got ", window);
    TORCH_CHECK(c == 0 || window >= windows[c - 1], "windows must come sorted ascending (the plan's order)");
    TORCH_CHECK(sinks[c] >= 0 && (sinks[c] == 0 || window < kFullWindow), "sinks[", c, "] invalid: ", sinks[c]);
    if (window >= kFullWindow) {
      has_full = 1;
    } else if (edges.empty() || edges.back() != window) {
      edges.push_back(static_cast<int>(window));
    }
  }
  return edges;
}

// Calls ``launch(T{}, std::integral_constant<int, D>{})`` for the inputs' dtype (bf16, fp16) and head dim.
template <typename Launch>
void dispatch_dtype_and_head_dim(at::ScalarType dtype, int64_t head_dim, Launch&& launch) {
  auto by_dim = [&](auto type) {
    if (head_dim == 64) launch(type, std::integral_constant<int, 64>{});
    else launch(type, std::integral_constant<int, 128>{});
  };
  if (dtype == at::kBFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

// Opts a kernel in to ``bytes`` of dynamic shared memory (once per kernel), with a clear error where the device
// has less than that per block.
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes) {
  int device = c10::cuda::current_device(), limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "this kernel needs ", bytes,
              " bytes of shared memory per block; the device offers ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace dash
