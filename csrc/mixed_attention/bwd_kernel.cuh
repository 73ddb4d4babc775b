// Backward of dash_kernels.mixed_attention in one pass over the score matrix (DESIGN.md, "Backward in one pass").
//
// With D_c[t] = <dY[t], O_c[t]> and, per row t and region r (the candidates that see (t, j), a function of the
// band of t - j and the sink level of j): ref_r = min_{c in r} LSE_c[t], A_r = sum_{c in r} w_c 2^(ref_r - LSE_c),
// B_r = sum_{c in r} w_c 2^(ref_r - LSE_c) D_c, every gradient is one FlashAttention-style sweep:
//   p = 2^(s2 - ref_r)   (<= 1: ref_r is the smallest LSE of the region's candidates)
//   dV_j += sum_t p A_r dY_t,   dS = p (A_r dP - B_r) with dP = dY_t . v_j,
//   dK_j += scale sum_t dS q_t,   dQ_t += scale sum_j dS k_j.
// Three kernels: the per-row coefficients (prep), dK/dV per key tile walking its query tiles, dQ per query tile
// walking its key tiles (scores recomputed in each, no atomics). Under GQA, dK/dV are per query head (fp32) and
// the launcher sums each group. Products: warp-level tensor-core MMA (wmma) as in the forward, each warp owning
// 16 rows (keys in dK/dV, queries in dQ) of a 64-row tile.
#pragma once

#include "fwd_kernel.cuh"

namespace dash {

constexpr int kMaxRegions = (kMaxCandidates + 1) * (kMaxCandidates + 1);

struct BwdParams : AttentionParams {
  const void* dy;  // [B, T, Hq, D] contiguous
  const void* o;   // [C, B, T, Hq, D] contiguous (forward's per-candidate outputs)
  const float* lse;  // [B, Hq, C, T] base 2
  const float* w;    // [Hq, C] sorted order
  float* delta;      // [B, Hq, C, T]: D_c
  float* ref;        // [B, Hq, R, T]
  float* coef_a;
  float* coef_b;
  void* dq;          // [B, T, Hq, D] contiguous, input dtype
  float* dk;         // [B, T, Hq, D] contiguous fp32 (per query head)
  float* dv;
  int num_regions;
  int band_edges[kMaxCandidates];  // distinct finite windows, ascending
  int num_bands;                   // band edges
  int sink_edges[kMaxCandidates];  // distinct positive sinks of windowed candidates, ascending
  int num_sinks;
  int membership[kMaxRegions];     // bit c set: sorted candidate c sees region r
  int has_full, widest, max_sink;
  float scale, scale_log2;
};

// Region of (t, j), t >= j: band (count of band edges <= t - j) x sink level (count of sink edges > j).
__device__ __forceinline__ int region_of(const BwdParams& p, int t, int j) {
  const int dist = t - j;
  int band = 0, level = 0;
  for (int e = 0; e < p.num_bands; ++e) band += dist >= p.band_edges[e];
  for (int e = 0; e < p.num_sinks; ++e) level += j < p.sink_edges[e];
  return band * (p.num_sinks + 1) + level;
}

// Does any candidate see some (t, j) with t in [m0, m1], j in [j0, j1]? (tile skipping, block-uniform)
__device__ __forceinline__ bool tile_visible(const BwdParams& p, int m0, int m1, int j0, int j1) {
  if (m1 < j0) return false;  // above the diagonal
  if (p.has_full || j0 < p.max_sink) return true;
  return m0 - j1 < p.widest;  // the nearest pair is inside the widest window
}

// The prep: D_c and the region coefficients of every row. A block takes kPrepRows consecutive rows. The dot
// products: a warp per row, lanes along the head dim, dY read once for every candidate. The coefficients: a
// thread per row, each warp a quarter of the regions, so that every store of a warp fills 128 consecutive bytes
// along T (a warp per row with lane 0 looping over the regions took 0.45 ms at the Qwen2.5-3B shape, 10 of 32
// lanes busy: benchmarks/NOTES.md, sessions 11 and 12).
constexpr int kPrepRows = 32;

template <typename T>
__global__ void __launch_bounds__(128) mixed_attention_bwd_prep_kernel(const BwdParams p, int head_dim) {
  __shared__ float delta_s[kMaxCandidates][kPrepRows];
  __shared__ float lse_s[kMaxCandidates][kPrepRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t0 = blockIdx.x * kPrepRows;
  const int bh = blockIdx.y;
  const int b = bh / p.heads_q, h = bh % p.heads_q;
  const int C = p.num_c;
  const int64_t plane = int64_t(p.batch) * p.seq * p.heads_q * head_dim;
  constexpr int kPerLane = 4;  // head dims up to 128
  for (int i = warp; i < kPrepRows && t0 + i < p.seq; i += 4) {  // warp-uniform bounds
    const int64_t row = ((int64_t(b) * p.seq + t0 + i) * p.heads_q + h) * head_dim;
    const T* dy = static_cast<const T*>(p.dy) + row;
    const T* o = static_cast<const T*>(p.o) + row;
    float dy_f[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) dy_f[k] = lane + 32 * k < head_dim ? Vec<T>::to_float(dy[lane + 32 * k]) : 0.f;
    for (int c = 0; c < C; ++c) {
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k)
        if (lane + 32 * k < head_dim) sum += dy_f[k] * Vec<T>::to_float(o[c * plane + lane + 32 * k]);
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) delta_s[c][i] = sum;
    }
  }
  __syncthreads();
  const int t = t0 + lane;
  const bool in_range = t < p.seq;
  const int64_t row_c = int64_t(bh) * C * p.seq + t;
  for (int c = warp; c < C && in_range; c += 4) {  // D_c out, LSE_c in: coalesced along T
    p.delta[row_c + int64_t(c) * p.seq] = delta_s[c][lane];
    lse_s[c][lane] = p.lse[row_c + int64_t(c) * p.seq];
  }
  __syncthreads();
  if (!in_range) return;
  const int64_t row_r = int64_t(bh) * p.num_regions * p.seq + t;
  for (int r = warp; r < p.num_regions; r += 4) {
    float ref = INFINITY, a = 0.f, bb = 0.f;
    for (int c = 0; c < C; ++c)
      if (p.membership[r] >> c & 1) ref = fminf(ref, lse_s[c][lane]);
    for (int c = 0; c < C; ++c)
      if (p.membership[r] >> c & 1) {
        const float term = p.w[h * C + c] * exp2f(ref - lse_s[c][lane]);
        a += term;
        bb += term * delta_s[c][lane];
      }
    p.ref[row_r + int64_t(r) * p.seq] = ref;
    p.coef_a[row_r + int64_t(r) * p.seq] = a;
    p.coef_b[row_r + int64_t(r) * p.seq] = bb;
  }
}

template <int D>
struct BwdTile {
  static constexpr int kRows = 64;  // rows of each tile (keys or queries), 4 warps x 16
  static constexpr int kThreads = 128;
  static constexpr int kLdH = D + 8;
  static constexpr int kLdS = kRows + 4;
  static constexpr int kLdP = kRows + 8;
  static constexpr int kLdA = D + 4;
  static constexpr size_t kHalfTile = size_t(kRows) * kLdH * 2;
  // four 16-bit tiles, two fp32 score tiles, two 16-bit probability tiles, two fp32 accumulators
  static constexpr size_t kSmemBytes = 4 * kHalfTile + 2 * size_t(kRows) * kLdS * 4 + 2 * size_t(kRows) * kLdP * 2 +
                                       2 * size_t(kRows) * kLdA * 4;
  static constexpr size_t kSmemBytesDq = kSmemBytes - size_t(kRows) * kLdA * 4;  // one accumulator, not two
};

// Issues the cp.async loads of one tile (fwd_kernel.cuh): the caller waits (cp_async_wait_all) and then
// synchronises the block before any warp reads it.
template <typename T, int D>
__device__ __forceinline__ void load_bwd_tile(T* dst, const T* base, int64_t stride_t, int row0, int seq) {
  using Tile = BwdTile<D>;
  load_rows_async<T, D, Tile::kRows, Tile::kLdH, Tile::kThreads>(dst, base, stride_t, row0, seq);
}

// The gradient factors of one (query t, key j) pair: returns false where no candidate sees it.
__device__ __forceinline__ bool pair_factors(const BwdParams& p, int bh, int t, int j, float s2, float dp,
                                             float& pa, float& ds) {
  if (t >= p.seq || j >= p.seq || j > t) return false;
  const int r = region_of(p, t, j);
  if (p.membership[r] == 0) return false;
  const int64_t at = (int64_t(bh) * p.num_regions + r) * p.seq + t;
  const float prob = exp2f(s2 - p.ref[at]);
  pa = prob * p.coef_a[at];
  ds = prob * (p.coef_a[at] * dp - p.coef_b[at]);
  return true;
}

// dK, dV of one 64-key tile for one query head: walks the query tiles that see it.
template <typename T, int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads) mixed_attention_bwd_dkdv_kernel(const BwdParams p) {
  using Tile = BwdTile<D>;
  constexpr int N = Tile::kRows;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + N * Tile::kLdH;
  T* sQ = sV + N * Tile::kLdH;
  T* sDy = sQ + N * Tile::kLdH;
  float* sS = reinterpret_cast<float*>(sDy + N * Tile::kLdH);  // [keys, queries] scores, then dP
  float* sDp = sS + N * Tile::kLdS;
  T* sPa = reinterpret_cast<T*>(sDp + N * Tile::kLdS);  // p A_r, [keys, queries]
  T* sDs = sPa + N * Tile::kLdP;                        // dS, [keys, queries]
  float* sDk = reinterpret_cast<float*>(sDs + N * Tile::kLdP);
  float* sDv = sDk + N * Tile::kLdA;

  const int j0 = blockIdx.x * N;
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const T* dy = static_cast<const T*>(p.dy) + (int64_t(b) * p.seq * p.heads_q + h) * D;
  const int64_t dy_stride_t = int64_t(p.heads_q) * D;

  for (int idx = threadIdx.x; idx < N * Tile::kLdA; idx += Tile::kThreads) sDk[idx] = sDv[idx] = 0.f;
  load_bwd_tile<T, D>(sK, k, p.k_stride[1], j0, p.seq);
  load_bwd_tile<T, D>(sV, v, p.v_stride[1], j0, p.seq);
  const int j1 = min(j0 + N, p.seq) - 1;
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;  // this thread: key j0 + row, half the queries
  for (int m0 = (j0 / N) * N; m0 < p.seq; m0 += N) {
    const int m1 = min(m0 + N, p.seq) - 1;
    if (!tile_visible(p, m0, m1, j0, j1)) {
      if (!p.has_full && j0 >= p.max_sink) break;  // every later query tile is farther
      continue;
    }
    __syncthreads();  // the previous tile's Q, dY are consumed
    load_bwd_tile<T, D>(sQ, q, p.q_stride[1], m0, p.seq);
    load_bwd_tile<T, D>(sDy, dy, dy_stride_t, m0, p.seq);
    cp_async_wait_all();  // this thread's chunks (and, on the first tile, K's and V's) have landed
    __syncthreads();
    warp_abt<T, D, N, Tile::kLdH, Tile::kLdS>(sK, sQ, sS);   // S^T [keys, queries]
    warp_abt<T, D, N, Tile::kLdH, Tile::kLdS>(sV, sDy, sDp);  // dP^T
    __syncwarp();
    const int j = j0 + row;
    for (int cc = 0; cc < N / 2; ++cc) {
      const int col = half * (N / 2) + cc, t = m0 + col;
      float pa = 0.f, ds = 0.f;
      pair_factors(p, bh, t, j, sS[row * Tile::kLdS + col] * p.scale_log2, sDp[row * Tile::kLdS + col], pa, ds);
      sPa[row * Tile::kLdP + col] = Vec<T>::from_float(pa);
      sDs[row * Tile::kLdP + col] = Vec<T>::from_float(ds);
    }
    __syncwarp();
    warp_accumulate<T, D, N, Tile::kLdP, Tile::kLdH, Tile::kLdA>(sPa, sDy, sDv);  // dV += (p A)^T dY
    warp_accumulate<T, D, N, Tile::kLdP, Tile::kLdH, Tile::kLdA>(sDs, sQ, sDk);   // dK += dS^T Q (scaled below)
    __syncwarp();
  }
  cp_async_wait_all();  // no copy may still be in flight when the block exits (no visible tile: K, V unread)
  __syncthreads();
  // write this thread's key row, half the columns
  const int j = j0 + row;
  if (j < p.seq) {
    const int64_t out = ((int64_t(b) * p.seq + j) * p.heads_q + h) * D;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) {
      p.dk[out + d] = sDk[row * Tile::kLdA + d] * p.scale;
      p.dv[out + d] = sDv[row * Tile::kLdA + d];
    }
  }
}

// dQ of one 64-query tile: walks the key tiles it sees.
template <typename T, int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads) mixed_attention_bwd_dq_kernel(const BwdParams p) {
  using Tile = BwdTile<D>;
  constexpr int N = Tile::kRows;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDy = sQ + N * Tile::kLdH;
  T* sK = sDy + N * Tile::kLdH;
  T* sV = sK + N * Tile::kLdH;
  float* sS = reinterpret_cast<float*>(sV + N * Tile::kLdH);  // [queries, keys]
  float* sDp = sS + N * Tile::kLdS;
  T* sDs = reinterpret_cast<T*>(sDp + N * Tile::kLdS);
  float* sDq = reinterpret_cast<float*>(sDs + 2 * N * Tile::kLdP);  // (room of the two probability tiles)

  const int m0 = (gridDim.x - 1 - blockIdx.x) * N;  // the longest walks (the last query tiles) first
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const T* dy = static_cast<const T*>(p.dy) + (int64_t(b) * p.seq * p.heads_q + h) * D;
  const int64_t dy_stride_t = int64_t(p.heads_q) * D;

  for (int idx = threadIdx.x; idx < N * Tile::kLdA; idx += Tile::kThreads) sDq[idx] = 0.f;
  load_bwd_tile<T, D>(sQ, q, p.q_stride[1], m0, p.seq);
  load_bwd_tile<T, D>(sDy, dy, dy_stride_t, m0, p.seq);
  const int m1 = min(m0 + N, p.seq) - 1;
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;  // this thread: query m0 + row, half the keys
  int cached_r = -1;  // the region whose coefficients (for this thread's query) are held below
  float cached_ref = 0.f, cached_a = 0.f, cached_b = 0.f;
  for (int j0 = 0; j0 <= m1; j0 += N) {
    const int j1 = min(j0 + N, p.seq) - 1;
    if (!tile_visible(p, m0, m1, j0, j1)) continue;
    __syncthreads();
    load_bwd_tile<T, D>(sK, k, p.k_stride[1], j0, p.seq);
    load_bwd_tile<T, D>(sV, v, p.v_stride[1], j0, p.seq);
    cp_async_wait_all();  // this thread's chunks (and, on the first tile, Q's and dY's) have landed
    __syncthreads();
    warp_abt<T, D, N, Tile::kLdH, Tile::kLdS>(sQ, sK, sS);   // S [queries, keys]
    warp_abt<T, D, N, Tile::kLdH, Tile::kLdS>(sDy, sV, sDp);  // dP
    __syncwarp();
    const int t = m0 + row;
    for (int cc = 0; cc < N / 2; ++cc) {
      const int col = half * (N / 2) + cc, j = j0 + col;
      // pair_factors' ds, with this row's (ref, A, B) of region r loaded only when r changes (t is fixed here,
      // and r changes at most at a band or sink edge along j)
      float ds = 0.f;
      if (t < p.seq && j < p.seq && j <= t) {
        const int r = region_of(p, t, j);
        if (p.membership[r] != 0) {
          if (r != cached_r) {
            const int64_t at = (int64_t(bh) * p.num_regions + r) * p.seq + t;
            cached_ref = p.ref[at];
            cached_a = p.coef_a[at];
            cached_b = p.coef_b[at];
            cached_r = r;
          }
          const float prob = exp2f(sS[row * Tile::kLdS + col] * p.scale_log2 - cached_ref);
          ds = prob * (cached_a * sDp[row * Tile::kLdS + col] - cached_b);
        }
      }
      sDs[row * Tile::kLdP + col] = Vec<T>::from_float(ds);
    }
    __syncwarp();
    warp_accumulate<T, D, N, Tile::kLdP, Tile::kLdH, Tile::kLdA>(sDs, sK, sDq);  // dQ += dS K (scaled below)
    __syncwarp();
  }
  cp_async_wait_all();  // as in dK/dV
  __syncthreads();
  const int t = m0 + row;
  if (t < p.seq) {
    T* out = static_cast<T*>(p.dq) + ((int64_t(b) * p.seq + t) * p.heads_q + h) * D;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d)
      out[d] = Vec<T>::from_float(sDq[row * Tile::kLdA + d] * p.scale);
  }
}

}  // namespace dash
