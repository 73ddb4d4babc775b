// Forward of dash_kernels.mixed_attention: all candidates of a layer in one walk over the keys.
//
// The single-pass design of DESIGN.md: a query tile walks its key tiles from the diagonal backward with one
// online-softmax state (m, l, acc) per row. Every window is a suffix of the keys ending at t, so the moment the
// walk has taken in all keys of window W_c, that state *is* candidate c's softmax over its window: snapshot
// O_c = acc / l and LSE_c = m + log2 l there, and keep walking for the wider candidates. A key tile that holds
// keys of several bands (distance ranges between consecutive window edges) takes them in band order, one
// sub-step each, so the snapshots fall between sub-steps. Sink keys come last: a sink candidate's window
// snapshot goes to fp32 scratch, the walk over its sink keys (those outside its window) builds a second state,
// and the two merge by log-sum-exp. Y = sum_c w[h, c] O_c accumulates in registers as the snapshots land.
//
// Outputs match the Triton backend exactly (its backward consumes them): O [C, B, T, Hq, D] in the input dtype
// and LSE [B, Hq, C, T] fp32 in the log2 domain (s2 = scale * log2(e) * q.k), candidates in the plan's sorted
// order (ascending window, full last).
//
// Matrix products: warp-level tensor-core MMA (nvcuda::wmma, bf16/fp16 in, fp32 out), 4 warps, each owning 16
// query rows of a 64-row tile; softmax by two threads per row. Shared memory holds the tiles, the scores, and
// the fp32 accumulator acc (Y stays in registers), so each warp touches only its own rows after a key tile is
// loaded (by cp.async, all chunks in flight at once): one block barrier per key tile. This is the correctness-first CUDA path (sm_80 and later); the Hopper mainloop (wgmma,
// TMA, warp specialisation) replaces the products and the loads, not this walk.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "warp_mma.cuh"

#include <cstdint>

namespace dash {

constexpr int kMaxCandidates = 8;
constexpr int kFullWindow = 1 << 30;  // spec.FULL_WINDOW: "no window"

// What both directions read of q, k, v (filled by host_checks.h's fill_attention_params).
struct AttentionParams {
  const void* q;  // [B, T, Hq, D], rows 16-byte aligned, last dim contiguous
  const void* k;  // [B, T, Hkv, D]
  const void* v;
  int64_t q_stride[3];  // batch, token, head (elements)
  int64_t k_stride[3];
  int64_t v_stride[3];
  int batch, seq, heads_q, group;  // group = Hq / Hkv
  int num_c;
};

// The (batch, query head) of a block's blockIdx.y and that head's q, k, v (GQA: k, v of its group).
template <typename T>
struct HeadView {
  int b, h;
  const T* q;
  const T* k;
  const T* v;
};

template <typename T>
__device__ __forceinline__ HeadView<T> head_view(const AttentionParams& p, int bh) {
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.group;
  return {b, h, static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2],
          static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[2],
          static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[2]};
}

struct FwdParams : AttentionParams {
  const float* w;  // [Hq, C] mixture weights, sorted candidate order
  void* y;         // [B, T, Hq, D] contiguous
  void* o;         // [C, B, T, Hq, D] contiguous
  float* lse;      // [B, Hq, C, T]
  float* sink_o;   // [C, B, T, Hq, D] fp32 scratch: window snapshots of sink candidates (else unused)
  float* sink_lse; // [B, Hq, C, T] likewise
  int windows[kMaxCandidates];  // sorted; kFullWindow for full causal
  int sinks[kMaxCandidates];
  int edges[kMaxCandidates];  // distinct finite windows, ascending
  int num_edges;
  int has_full;
  float scale_log2;  // scale * log2(e)
};

template <typename T>
struct Vec {
  static __device__ __forceinline__ float to_float(T x);
  static __device__ __forceinline__ T from_float(float x);
};
template <>
struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};
template <>
struct Vec<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
};

template <int D>
struct FwdTile {
  static constexpr int kBlockM = 64;  // query rows per block: 4 warps x 16
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kThreads = 128;
  static constexpr int kLdH = D + 8;            // 16-bit tiles (Q, K, V): rows 16 B apart from the banks' period
  static constexpr int kLdS = kBlockN + 4;      // fp32 scores
  static constexpr int kLdP = kBlockN + 8;      // 16-bit probabilities
  static constexpr int kLdA = D + 4;            // fp32 accumulator (acc)
  static constexpr int kColsS = kBlockN / 2;    // score columns per thread (two threads a row)
  static constexpr int kColsD = D / 2;          // accumulator columns per thread
  // bytes; every region a multiple of 32 B, so that each wmma pointer stays 256-bit aligned. Y lives in the
  // registers of its row's two threads (kColsD floats each), not here: 113,152 B at D 128 lets two blocks share
  // an SM (228 KB, 1 KB reserved a block), 72,192 B at D 64 three.
  static constexpr size_t kHalfTile = size_t(kBlockM) * kLdH * 2;
  static constexpr size_t kSmemBytes = 3 * kHalfTile + size_t(kBlockM) * kLdP * 2 + size_t(kBlockM) * kLdS * 4 +
                                       size_t(kBlockM) * kLdA * 4 + 2 * size_t(kBlockM) * 4;
  static constexpr int kMinBlocks = D <= 64 ? 3 : 2;  // per SM, for __launch_bounds__ (register cap)
};

// cp.async of 16 bytes, zero-filled (nothing read) where !valid; and the wait for all of this thread's copies.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const unsigned dst_shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Loads rows [row0, row0 + ROWS) of one head of a [B, T, H, D] tensor into shared memory by cp.async, 16 B a
// thread and chunk (8 consecutive elements of a row), zeros past T (a zero V row keeps 0 * V finite where a
// probability is 0; src-size 0 reads nothing, and the source address is then the head's row 0, always valid).
// ``at(r, c)`` is the shared address of element (r, c), c a multiple of 8: a plain pitch (load_rows_async) or a
// swizzled layout (the sm90 forward's, under which a chunk stays contiguous). All THREADS threads of the block take
// part. Nothing is waited for here: the caller issues every tile it needs, then cp_async_wait_all() and a block
// barrier, so that all the loads are in flight at once.
template <typename T, int D, int ROWS, int THREADS, typename At>
__device__ __forceinline__ void load_rows_to(At at, const T* base, int64_t stride_t, int row0, int seq) {
  constexpr int kChunks = D / 8;  // 16-byte chunks a row
  static_assert(ROWS * kChunks % THREADS == 0, "every thread issues the same number of chunks");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int idx = threadIdx.x + i * THREADS;
    const int row = idx / kChunks, chunk = idx % kChunks;
    const bool valid = row0 + row < seq;
    cp_async_16(at(row, chunk * 8), valid ? base + (row0 + row) * stride_t + chunk * 8 : base, valid);
  }
}

// load_rows_to into a tile of row pitch LD
template <typename T, int D, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void load_rows_async(T* dst, const T* base, int64_t stride_t, int row0, int seq) {
  load_rows_to<T, D, ROWS, THREADS>([dst](int r, int c) { return static_cast<void*>(dst + r * LD + c); }, base,
                                    stride_t, row0, seq);
}

template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* dst, const T* base, int64_t stride_t, int row0, int seq) {
  using Tile = FwdTile<D>;
  static_assert(Tile::kBlockM == Tile::kBlockN, "Q, K and V tiles share one loader");
  load_rows_async<T, D, Tile::kBlockN, Tile::kLdH, Tile::kThreads>(dst, base, stride_t, row0, seq);
}

// Stores 8 consecutive values as T (each rounded as Vec<T>::from_float rounds it) in one 16-byte store.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float* values) {
  alignas(16) T packed[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) packed[i] = Vec<T>::from_float(values[i]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
}

// One sub-step of the walk for this thread's row: take in the keys of the current tile that ``include``
// admits, with the same running max for the whole row (two threads share a row: lanes 2r and 2r + 1).
template <typename T, int D, typename Include>
__device__ __forceinline__ void online_softmax_step(const float* sS, T* sP, float* sAcc, float* sM, float* sL,
                                                    const T* sV, int row, int half, int j0, float scale_log2,
                                                    Include include) {
  using Tile = FwdTile<D>;
  const int c0 = half * Tile::kColsS;
  // this thread's scores and probabilities: 16-byte aligned (row pitches and c0 are multiples of 16 B), read 4
  // and written 8 at a time, in the same column order as one at a time
  const float* s_row = sS + row * Tile::kLdS + c0;
  T* p_row = sP + row * Tile::kLdP + c0;
  float mx = -INFINITY;
#pragma unroll
  for (int c4 = 0; c4 < Tile::kColsS; c4 += 4) {
    const float4 s4 = *reinterpret_cast<const float4*>(s_row + c4);
    const float sv[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (include(j0 + c0 + c4 + i)) mx = fmaxf(mx, sv[i] * scale_log2);
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  const float m_old = sM[row];
  const float m_new = fmaxf(m_old, mx);
  const bool empty = (m_new == -INFINITY);  // nothing taken in yet, nor now
  const float alpha = empty ? 1.f : exp2f(m_old - m_new);
  float sum = 0.f;
#pragma unroll
  for (int c8 = 0; c8 < Tile::kColsS; c8 += 8) {
    const float4 lo4 = *reinterpret_cast<const float4*>(s_row + c8);
    const float4 hi4 = *reinterpret_cast<const float4*>(s_row + c8 + 4);
    const float sv[8] = {lo4.x, lo4.y, lo4.z, lo4.w, hi4.x, hi4.y, hi4.z, hi4.w};
    float pv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float p = 0.f;
      if (!empty && include(j0 + c0 + c8 + i)) p = exp2f(sv[i] * scale_log2 - m_new);
      sum += p;
      pv[i] = p;
    }
    store8(p_row + c8, pv);
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  const float l_old = sL[row];
  __syncwarp();  // both threads of the row have read m_old, l_old
  if (half == 0) {
    sM[row] = m_new;
    sL[row] = l_old * alpha + sum;
  }
  if (alpha != 1.f) {  // x * 1 == x: a row whose max did not move keeps its accumulator as it is
    float* acc_row = sAcc + row * Tile::kLdA + half * Tile::kColsD;  // 16-byte aligned
#pragma unroll
    for (int d = 0; d < Tile::kColsD; d += 4) {
      float4 a = *reinterpret_cast<float4*>(acc_row + d);
      a.x *= alpha;
      a.y *= alpha;
      a.z *= alpha;
      a.w *= alpha;
      *reinterpret_cast<float4*>(acc_row + d) = a;
    }
  }
  __syncwarp();
  // acc[16 rows of this warp] += P V
  warp_accumulate<T, D, Tile::kBlockN, Tile::kLdP, Tile::kLdH, Tile::kLdA>(sP, sV, sAcc);
  __syncwarp();
}

// S[16 rows of this warp, 64 keys] = Q K^T (unscaled, fp32) into shared memory.
template <typename T, int D>
__device__ __forceinline__ void warp_scores(const T* sQ, const T* sK, float* sS) {
  using Tile = FwdTile<D>;
  warp_abt<T, D, Tile::kBlockN, Tile::kLdH, Tile::kLdS>(sQ, sK, sS);
  __syncwarp();
}

template <typename T, int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, FwdTile<D>::kMinBlocks) mixed_attention_fwd_kernel(const FwdParams p) {
  using Tile = FwdTile<D>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * Tile::kLdH;
  T* sV = sK + BN * Tile::kLdH;
  T* sP = sV + BN * Tile::kLdH;
  float* sS = reinterpret_cast<float*>(sP + BM * Tile::kLdP);
  float* sAcc = sS + BM * Tile::kLdS;
  float* sM = sAcc + BM * Tile::kLdA;
  float* sL = sM + BM;

  // the longest walks (the last query tiles) first, so that the short ones fill the last wave
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int t = m0 + row;
  const bool row_ok = t < p.seq;
  const int C = p.num_c;
  T* o = static_cast<T*>(p.o);
  T* y = static_cast<T*>(p.y);
  const int64_t row_elems = int64_t(p.heads_q) * D;  // one token's row of y / o
  const int64_t o_plane = int64_t(p.batch) * p.seq * row_elems;
  const int64_t out_row = (int64_t(b) * p.seq + t) * row_elems + int64_t(h) * D + half * Tile::kColsD;
  const int64_t lse_row = (int64_t(bh) * C) * p.seq + t;  // + c * seq

  auto reset_state = [&]() {
    if (half == 0) {
      sM[row] = -INFINITY;
      sL[row] = 0.f;
    }
    float* acc_row = sAcc + row * Tile::kLdA + half * Tile::kColsD;
    for (int d = 0; d < Tile::kColsD; ++d) acc_row[d] = 0.f;
  };
  reset_state();
  // Y = sum_c w_c O_c of this thread's row and half, in registers (every index below is a compile-time constant)
  float y_acc[Tile::kColsD];
#pragma unroll
  for (int d = 0; d < Tile::kColsD; ++d) y_acc[d] = 0.f;
  // Q arrives with the first key tile: the walk's first cp_async_wait_all and barrier cover it (the walk has at
  // least one tile: last_row >= m0 >= lowest_key)
  load_tile_async<T, D>(sQ, q, p.q_stride[1], m0, p.seq);

  // Writes candidate c's output for this thread's row and half, and adds w * O_c to Y.
  auto emit = [&](int c, const float* out, float scale_out, float lse) {
    T* dst = o + c * o_plane + out_row;  // 16-byte aligned: out_row is a multiple of kColsD elements
    const float wc = p.w[h * C + c];
#pragma unroll
    for (int d8 = 0; d8 < Tile::kColsD; d8 += 8) {
      float value[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        value[i] = out[d8 + i] * scale_out;
        y_acc[d8 + i] += wc * value[i];
      }
      store8(dst + d8, value);
    }
    if (half == 0) p.lse[lse_row + int64_t(c) * p.seq] = lse;
  };
  // Snapshots every candidate of window ``window`` whose lowest key for this row lies in the tile at j0.
  auto snapshot = [&](int window, int j0) {
    if (!row_ok) return;
    const int lo = window >= kFullWindow ? 0 : max(0, t - window + 1);
    if (lo < j0 || lo >= j0 + BN) return;
    const float l = sL[row], m = sM[row];
    const float* acc_row = sAcc + row * Tile::kLdA + half * Tile::kColsD;
    const float lse = m + log2f(l);
    for (int c = 0; c < C; ++c) {
      if (p.windows[c] != window) continue;
      if (p.sinks[c] > 0) {  // fp32 scratch until its sink keys are merged in
        float* dst = p.sink_o + c * o_plane + out_row;
#pragma unroll
        for (int d = 0; d < Tile::kColsD; d += 4)
          *reinterpret_cast<float4*>(dst + d) =
              make_float4(acc_row[d] / l, acc_row[d + 1] / l, acc_row[d + 2] / l, acc_row[d + 3] / l);
        if (half == 0) p.sink_lse[lse_row + int64_t(c) * p.seq] = lse;
      } else {
        emit(c, acc_row, 1.f / l, lse);
      }
    }
  };

  // The walk: from the tile holding the last query's diagonal down to the lowest key any window needs.
  const int last_row = min(m0 + BM, p.seq) - 1;
  const int widest = p.num_edges ? p.edges[p.num_edges - 1] : 1;
  const int lowest_key = p.has_full ? 0 : max(0, m0 - widest + 1);
  for (int kb = last_row / BN; kb >= lowest_key / BN; --kb) {
    const int j0 = kb * BN;
    __syncthreads();  // every warp is done with the previous K, V
    load_tile_async<T, D>(sK, k, p.k_stride[1], j0, p.seq);
    load_tile_async<T, D>(sV, v, p.v_stride[1], j0, p.seq);
    cp_async_wait_all();  // this thread's chunks (and, on the first tile, Q's) have landed
    __syncthreads();      // everyone's have
    warp_scores<T, D>(sQ, sK, sS);
    // distances t - j this tile spans, over all its rows (the same for every thread: no divergence)
    const int d_min = m0 - (j0 + BN - 1), d_max = last_row - j0;
    for (int band = 0; band <= p.num_edges; ++band) {
      const int lo = band == 0 ? 0 : p.edges[band - 1];
      const int hi = band < p.num_edges ? p.edges[band] : kFullWindow;
      if (band == p.num_edges && !p.has_full) break;
      if (d_max >= lo && d_min < hi && d_max >= 0) {
        online_softmax_step<T, D>(sS, sP, sAcc, sM, sL, sV, row, half, j0, p.scale_log2, [&](int j) {
          const int dist = t - j;
          return row_ok && j < p.seq && dist >= lo && dist < hi;
        });
      }
      snapshot(hi, j0);
    }
  }

  // Sink candidates: their sink keys outside the window, then the merge with the window snapshot.
  for (int c = 0; c < C; ++c) {
    const int sink = p.sinks[c];
    if (sink == 0) continue;
    const int window = p.windows[c];
    const int lo = row_ok ? max(0, t - window + 1) : 0;  // the window's lowest key
    const int limit = min(sink, lo);                       // sink keys j < limit lie outside the window
    __syncwarp();
    reset_state();
    __syncwarp();
    for (int kb = 0; kb * BN < sink && kb * BN < p.seq; ++kb) {
      const int j0 = kb * BN;
      __syncthreads();
      load_tile_async<T, D>(sK, k, p.k_stride[1], j0, p.seq);
      load_tile_async<T, D>(sV, v, p.v_stride[1], j0, p.seq);
      cp_async_wait_all();
      __syncthreads();
      warp_scores<T, D>(sQ, sK, sS);
      online_softmax_step<T, D>(sS, sP, sAcc, sM, sL, sV, row, half, j0, p.scale_log2,
                                [&](int j) { return row_ok && j < limit; });
    }
    if (!row_ok) continue;
    const float* window_out = p.sink_o + c * o_plane + out_row;
    const float lse_w = p.sink_lse[lse_row + int64_t(c) * p.seq];  // written by this row's half-0 thread
    const float l_s = sL[row], m_s = sM[row];
    const float* acc_row = sAcc + row * Tile::kLdA + half * Tile::kColsD;
    float merged[Tile::kColsD];
    float lse = lse_w;
    if (l_s > 0.f) {
      const float top = fmaxf(lse_w, m_s);
      const float a = exp2f(lse_w - top), bs = exp2f(m_s - top);
      const float total = a + l_s * bs;
#pragma unroll
      for (int d = 0; d < Tile::kColsD; ++d) merged[d] = (window_out[d] * a + acc_row[d] * bs) / total;
      lse = top + log2f(total);
    } else {
#pragma unroll
      for (int d = 0; d < Tile::kColsD; ++d) merged[d] = window_out[d];
    }
    emit(c, merged, 1.f, lse);
  }

  if (row_ok) {
    T* dst = y + out_row;
#pragma unroll
    for (int d8 = 0; d8 < Tile::kColsD; d8 += 8) store8(dst + d8, y_acc + d8);
  }
}

}  // namespace dash
