// Backward of dash_kernels.mixed_attention, FlashAttention-2 style mainloop (DASH_CUDA_BWD=mma selects it; see
// bwd.cu). The same math as bwd_kernel.cuh (DESIGN.md, "Backward in one pass"), the same per-row region
// coefficients (ref_r, A_r, B_r from mixed_attention_bwd_prep_kernel) and the same region logic per (t, j):
//   p = 2^(s2 - ref_r),  dV_j += sum_t p A_r dY_t,  dS = p (A_r dP - B_r),  dK_j += scale sum_t dS q_t,
//   dQ_t += scale sum_j dS k_j.
// What differs is the mainloop: one kernel per 128-key tile (8 warps, each owning 16 keys) walking the query
// tiles (64 rows) that see it, with every product an mma.sync m16n8k16 (inline PTX of fwd_mma_kernel.cuh,
// mma16::) fed by ldmatrix, and the accumulators in registers:
//   S^T = K Q^T and dP^T = V dY^T (16 keys x 64 queries a warp, C fragments), p and dS per element from them,
//   rounded to 16 bits straight into A fragments (the C fragment of m16n8k16 is, pair by pair, the A fragment of
//   the next product): dV += (p A)^T dY and dK += dS^T Q (ldmatrix.trans of dY, Q), dK and dV [16 keys, D] in
//   registers for the whole walk. dS^T also goes to shared memory, and dQ[64 queries, D] += dS K (ldmatrix.trans
//   of dS^T and K; each warp 16 queries x D/2) is added, pre-scaled, into an fp32 buffer by atomics (FA2's
//   approach; the launcher converts it to the input dtype). Q, dY and the tile's region coefficients are
//   double-buffered by cp.async (the next query tile's loads fly while this one is computed).
// Under GQA, dK/dV are per query head (fp32), summed per group by the launcher, as in bwd_kernel.cuh.
// Fragment layouts: see fwd_mma_kernel.cuh (g = lane / 4, q = lane % 4; C rows g, g + 8, cols 2q, 2q + 1).
#pragma once

#include "bwd_kernel.cuh"
#include "fwd_mma_kernel.cuh"

#include <cstdint>

namespace dash {

struct BwdMmaParams : BwdParams {
  float* dq_accum;  // [B, T, Hq, D] fp32, zeroed: dQ (already multiplied by scale) accumulates here
  // the sm90 backward with GQA (group > 1): [B, T, Hkv, D] fp32, zeroed, where every query head of a group adds its
  // dK (times scale) / dV by atomics, instead of dk / dv per query head summed afterwards (nullptr: per query head)
  float* dk_accum;
  float* dv_accum;
};

template <int D>
struct BwdMmaTile {
  static constexpr int kBlockN = 128;  // keys per block: 8 warps x 16
  static constexpr int kBlockM = 64;   // queries per step of the walk
  static constexpr int kWarps = kBlockN / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = D + 8;        // 16-bit tiles (K, V, Q, dY): rows 16 B apart modulo 128 B
  static constexpr int kLdS = kBlockM + 8;  // dS^T [keys, queries] 16-bit: 144 B rows, likewise
  static constexpr int kScoreTiles = kBlockM / 8;  // n8 tiles of S^T a warp holds
  static constexpr int kOutTiles = D / 8;          // n8 tiles of dK, dV a warp holds
  static constexpr int kDqTiles = D / 2 / 8;       // n8 tiles of dQ a warp holds (half of D, 16 queries)
  static constexpr size_t kKVBytes = size_t(kBlockN) * kLd * 2;  // K or V
  static constexpr size_t kQBytes = size_t(kBlockM) * kLd * 2;   // Q or dY, one stage
  static constexpr size_t kDsBytes = size_t(kBlockN) * kLdS * 2;
  // K, V, two stages of (Q, dY), dS^T; then two stages of the region coefficients (3 R kBlockM floats each,
  // sized by the launcher): 157,696 B at D 128, 92,160 B at D 64, before the coefficients
  static constexpr size_t kBaseBytes = 2 * kKVBytes + 4 * kQBytes + kDsBytes;
  static size_t smem_bytes(int num_regions) { return kBaseBytes + 2 * coef_bytes(num_regions); }
  static size_t coef_bytes(int num_regions) { return size_t(3) * num_regions * kBlockM * 4; }
  static_assert(kWarps == 8 && kBlockM == 64, "the dQ split below assumes 8 warps of 4 query groups x 2 halves");
};

// cp.async of 4 bytes (L1-allocating: .ca, the only form for 4), zero-filled where !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  const unsigned dst_shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_shared), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// Band count of a distance (edges <= dist) and sink level of a key (sink edges > j): region_of's two halves.
__device__ __forceinline__ int band_of(const BwdParams& p, int dist) {
  int band = 0;
  for (int e = 0; e < p.num_bands; ++e) band += dist >= p.band_edges[e];
  return band;
}
__device__ __forceinline__ int level_of(const BwdParams& p, int j) {
  int level = 0;
  for (int e = 0; e < p.num_sinks; ++e) level += j < p.sink_edges[e];
  return level;
}

// acc[16 keys x BM queries] += A B^T over the head dim: A this warp's 16 rows of a key tile (K or V; a_lane: this
// lane's ldmatrix address in it), B the BM rows of a query tile (Q or dY; b_lane likewise), row pitch LD.
template <typename T, int D, int BM, int LD>
__device__ __forceinline__ void keys_by_queries(float (&acc)[BM / 8][4], uint32_t a_lane, uint32_t b_lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    mma16::ldmatrix_x4(a, a_lane + kk * 16 * 2);
#pragma unroll
    for (int np = 0; np < BM / 16; ++np) {
      uint32_t bq[4];
      mma16::ldmatrix_x4(bq, b_lane + (np * 16 * LD + kk * 16) * 2);
      mma16::mma<T>(acc[2 * np], a, bq[0], bq[1]);
      mma16::mma<T>(acc[2 * np + 1], a, bq[2], bq[3]);
    }
  }
}

// acc[16 keys x D] += A B over BM queries: A this warp's [16 keys, BM queries] as 16-bit A fragments (p A or
// dS^T), B the BM rows of a query tile (dY or Q) read by ldmatrix.trans (b_lane: this lane's address in it).
template <typename T, int D, int BM, int LD>
__device__ __forceinline__ void keys_by_head_dim(float (&acc)[D / 8][4], const uint32_t (&a)[BM / 16][4],
                                                 uint32_t b_lane) {
#pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t bt[4];
      mma16::ldmatrix_x4_trans(bt, b_lane + (kk * 16 * LD + np * 16) * 2);
      mma16::mma<T>(acc[2 * np], a[kk], bt[0], bt[1]);
      mma16::mma<T>(acc[2 * np + 1], a[kk], bt[2], bt[3]);
    }
  }
}

// C fragment n of a score tile (4 floats: rows g, g + 8, cols 8 n + 2q, +1) into the 16-bit A fragment layout
// (the C fragments of n8 tiles 2 kk and 2 kk + 1 are, pair by pair, A fragment kk).
template <typename T, int BM>
__device__ __forceinline__ void pack_as_a(uint32_t (&frag)[BM / 16][4], int n, const float (&x)[4]) {
  frag[n >> 1][2 * (n & 1)] = mma16::pack2<T>(x[0], x[1]);
  frag[n >> 1][2 * (n & 1) + 1] = mma16::pack2<T>(x[2], x[3]);
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdMmaTile<D>::kThreads, 1) mixed_attention_bwd_dkdv_mma_kernel(
    const BwdMmaParams p) {
  using Tile = BwdMmaTile<D>;
  constexpr int BN = Tile::kBlockN, BM = Tile::kBlockM, LD = Tile::kLd, LDS = Tile::kLdS;
  constexpr int NS = Tile::kScoreTiles, ND = Tile::kOutTiles, NQ = Tile::kDqTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LD;
  T* sQ0 = sV + BN * LD;  // stage s: Q at sQ0 + 2 s BM LD, dY right after it
  T* sDs = sQ0 + 4 * BM * LD;  // dS^T [keys, queries]
  float* sCoef0 = reinterpret_cast<float*>(sDs + BN * LDS);  // stage s: + s 3 R BM; [ref | A | B][region][query]

  const int R = p.num_regions;
  const int j0 = blockIdx.x * BN;  // the lowest keys (the longest walks under a full candidate) first
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const T* dy = static_cast<const T*>(p.dy) + (int64_t(b) * p.seq * p.heads_q + h) * D;
  const int64_t dy_stride_t = int64_t(p.heads_q) * D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, quad = lane & 3;
  const int jw0 = j0 + 16 * warp;  // the warp's first key
  int key[2];                      // this thread's keys (C fragment rows g, g + 8)
  key[0] = jw0 + g;
  key[1] = key[0] + 8;

  // The query tiles that see this key tile: from the one holding j0 up to the farthest any candidate reaches
  // (bwd_kernel.cuh's tile_visible: every tile from j0 on is visible under a full candidate or a sink over j0,
  // else those with m0 - j1 < widest).
  const int j1 = min(j0 + BN, p.seq) - 1;
  const int m_begin = (j0 / BM) * BM;
  const int m_end = (p.has_full || j0 < p.max_sink) ? p.seq : min(p.seq, j1 + p.widest);
  const int steps = (m_end - m_begin + BM - 1) / BM;  // >= 1: the tile at j0 sees its own diagonal

  auto issue_step = [&](int step) {
    const int m0 = m_begin + step * BM;
    T* sQ = sQ0 + (step & 1) * 2 * BM * LD;
    load_rows_async<T, D, BM, LD, Tile::kThreads>(sQ, q, p.q_stride[1], m0, p.seq);
    load_rows_async<T, D, BM, LD, Tile::kThreads>(sQ + BM * LD, dy, dy_stride_t, m0, p.seq);
    float* sCoef = sCoef0 + (step & 1) * 3 * R * BM;
    const int n = 3 * R * BM;
    for (int idx = threadIdx.x; idx < n; idx += Tile::kThreads) {
      const int which = idx / (R * BM), r = (idx / BM) % R, tl = idx % BM;
      const float* src = which == 0 ? p.ref : which == 1 ? p.coef_a : p.coef_b;  // (no local array)
      const float* base = src + (int64_t(bh) * R + r) * p.seq;
      const bool valid = m0 + tl < p.seq;
      cp_async_4(sCoef + idx, valid ? base + m0 + tl : base, valid);
    }
  };

  load_rows_async<T, D, BN, LD, Tile::kThreads>(sK, k, p.k_stride[1], j0, p.seq);
  load_rows_async<T, D, BN, LD, Tile::kThreads>(sV, v, p.v_stride[1], j0, p.seq);
  issue_step(0);

  // ldmatrix row addresses of this lane (fwd_mma_kernel.cuh's conventions)
  const int mat_lo = (lane >> 3) & 1, mat_hi = lane >> 4, r8 = lane & 7;
  // A operand, rows = this warp's 16 keys of K (S^T) or V (dP^T)
  const uint32_t k_a = mma16::smem_u32(sK + (16 * warp + 8 * mat_lo + r8) * LD + 8 * mat_hi);
  const uint32_t v_a = mma16::smem_u32(sV + (16 * warp + 8 * mat_lo + r8) * LD + 8 * mat_hi);
  // B operand, n = queries of Q (S^T) or dY (dP^T): bytes from the tile's start
  const uint32_t qb_lane = ((8 * mat_hi + r8) * LD + 8 * mat_lo) * 2;
  // B operand by ldmatrix.trans, k = queries, n = d, of dY (dV) or Q (dK); also k = keys of K (dQ)
  const uint32_t trans_lane = ((8 * mat_lo + r8) * LD + 8 * mat_hi) * 2;
  const uint32_t q_base = mma16::smem_u32(sQ0);
  constexpr uint32_t kStageBytes = 2 * Tile::kQBytes;
  // dQ: this warp's 16 queries (group qg) and half of D (dh)
  const int qg = warp & 3, dh = warp >> 2;
  // A operand of dQ = dS [queries, keys] by ldmatrix.trans of dS^T [keys, queries]: matrix m = (keys 8 (m / 2),
  // queries 8 (m % 2)) of each 16 x 16 block, i.e. a[0] (g, 2q) .. a[3] (g + 8, 2q + 8) of the PTX A layout
  const uint32_t ds_a = mma16::smem_u32(sDs + (8 * mat_hi + r8) * LDS + 16 * qg + 8 * mat_lo);
  const uint32_t k_trans = mma16::smem_u32(sK) + trans_lane + dh * (D / 2) * 2;

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;

  // warp-uniform facts about the warp's keys
  const bool keys_full = jw0 + 15 < p.seq;
  const int level_lo = level_of(p, jw0), level_hi = level_of(p, jw0 + 15);

  for (int step = 0; step < steps; ++step) {
    const int m0 = m_begin + step * BM;
    cp_async_wait_all();
    __syncthreads();  // this step's tiles have landed; every warp is done with the other stage and with sDs
    if (step + 1 < steps) issue_step(step + 1);
    const uint32_t q_tile = q_base + (step & 1) * kStageBytes;
    const uint32_t dy_tile = q_tile + uint32_t(Tile::kQBytes);
    const float* sCoef = sCoef0 + (step & 1) * 3 * R * BM;

    // Which (t, j) pairs of the warp's 16 keys x BM queries any candidate sees (warp-uniform).
    const int t_last = min(m0 + BM - 1, p.seq - 1);
    const int d_min = m0 - (jw0 + 15), d_max = t_last - jw0;
    bool active = jw0 < p.seq && d_max >= 0 && (p.has_full || jw0 < p.max_sink || d_min < p.widest);
    // one region for every pair: no tail, no diagonal, one band and one sink level
    int uniform_r = -1;
    if (active && keys_full && m0 + BM <= p.seq && d_min >= 0 && level_lo == level_hi) {
      const int band = band_of(p, d_min);
      if (band == band_of(p, d_max)) uniform_r = band * (p.num_sinks + 1) + level_lo;
    }
    if (uniform_r >= 0 && p.membership[uniform_r] == 0) active = false;

    uint32_t* ds_row[2];  // this thread's dS^T words (rows g, g + 8; + 4 n: cols 8 n + 2q, +1)
#pragma unroll
    for (int i = 0; i < 2; ++i) ds_row[i] = reinterpret_cast<uint32_t*>(sDs + (16 * warp + g + 8 * i) * LDS + 2 * quad);

    if (active) {
      float s[NS][4], dp[NS][4];
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
      // S^T = K Q^T, dP^T = V dY^T: 16 keys x BM queries
      keys_by_queries<T, D, BM, LD>(s, k_a, q_tile + qb_lane);
      keys_by_queries<T, D, BM, LD>(dp, v_a, dy_tile + qb_lane);
      // p A and dS per element: element (n, e) is key key[e / 2], query m0 + 8 n + 2 quad + (e & 1)
      const float* sRef = sCoef;
      const float* sA = sCoef + R * BM;
      const float* sB = sCoef + 2 * R * BM;
      uint32_t pa_frag[BM / 16][4], ds_frag[BM / 16][4];
      if (uniform_r >= 0) {
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          const int col = 8 * n + 2 * quad;
          const float2 ref2 = *reinterpret_cast<const float2*>(sRef + uniform_r * BM + col);
          const float2 a2 = *reinterpret_cast<const float2*>(sA + uniform_r * BM + col);
          const float2 b2 = *reinterpret_cast<const float2*>(sB + uniform_r * BM + col);
          float pa[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool odd = e & 1;
            const float prob = exp2f(fmaf(s[n][e], p.scale_log2, -(odd ? ref2.y : ref2.x)));
            const float ca = odd ? a2.y : a2.x, cb = odd ? b2.y : b2.x;
            pa[e] = prob * ca;
            ds[e] = prob * (ca * dp[n][e] - cb);
          }
          pack_as_a<T, BM>(pa_frag, n, pa);
          pack_as_a<T, BM>(ds_frag, n, ds);
        }
      } else {
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          float pa[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = 8 * n + 2 * quad + (e & 1);
            const int t = m0 + col, j = key[e >> 1];
            pa[e] = ds[e] = 0.f;
            // bwd_kernel.cuh's pair_factors
            if (t < p.seq && j < p.seq && j <= t) {
              const int r = band_of(p, t - j) * (p.num_sinks + 1) + level_of(p, j);
              if (p.membership[r] != 0) {
                const float prob = exp2f(fmaf(s[n][e], p.scale_log2, -sRef[r * BM + col]));
                const float ca = sA[r * BM + col];
                pa[e] = prob * ca;
                ds[e] = prob * (ca * dp[n][e] - sB[r * BM + col]);
              }
            }
          }
          pack_as_a<T, BM>(pa_frag, n, pa);
          pack_as_a<T, BM>(ds_frag, n, ds);
        }
      }
      // dS^T to shared memory for dQ: A fragment register 2 (n & 1) + i holds row g + 8 i, cols 8 n + 2q, +1
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        ds_row[0][4 * n] = ds_frag[n >> 1][2 * (n & 1)];
        ds_row[1][4 * n] = ds_frag[n >> 1][2 * (n & 1) + 1];
      }
      // dV += (p A)^T dY, dK += dS^T Q: A = this warp's [16 keys, 16 queries] blocks, B by ldmatrix.trans
      keys_by_head_dim<T, D, BM, LD>(dv, pa_frag, dy_tile + trans_lane);
      keys_by_head_dim<T, D, BM, LD>(dk, ds_frag, q_tile + trans_lane);
    } else {
#pragma unroll
      for (int n = 0; n < NS; ++n) ds_row[0][4 * n] = ds_row[1][4 * n] = 0u;
    }
    __syncthreads();  // dS^T of every warp is in shared memory

    // dQ[16 queries of group qg, half dh of D] += dS[queries, 128 keys] K[keys, D half], times scale, by atomics.
    // Warp-uniform skip: its queries lie past T.
    if (m0 + 16 * qg < p.seq) {
      float dq[NQ][4];
#pragma unroll
      for (int d = 0; d < NQ; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        if (16 * kk >= p.seq - j0) break;  // keys past T (dS 0 there): block-uniform
        uint32_t a[4];
        mma16::ldmatrix_x4_trans(a, ds_a + kk * 16 * LDS * 2);
#pragma unroll
        for (int np = 0; np < NQ / 2; ++np) {
          uint32_t bt[4];
          mma16::ldmatrix_x4_trans(bt, k_trans + (kk * 16 * LD + np * 16) * 2);
          mma16::mma<T>(dq[2 * np], a, bt[0], bt[1]);
          mma16::mma<T>(dq[2 * np + 1], a, bt[2], bt[3]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int t = m0 + 16 * qg + g + 8 * i;
        if (t >= p.seq) continue;
        float* dst = p.dq_accum + ((int64_t(b) * p.seq + t) * p.heads_q + h) * D + dh * (D / 2) + 2 * quad;
#pragma unroll
        for (int d = 0; d < NQ; ++d) atomic_add2(dst + 8 * d, dq[d][2 * i] * p.scale, dq[d][2 * i + 1] * p.scale);
      }
    }
  }
  cp_async_wait_all();  // nothing in flight at exit (every step waited already; kept for symmetry)

  // this thread's dK, dV: keys key[i], cols 8 d + 2 quad, +1 (fp32, per query head)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (key[i] >= p.seq) continue;
    const int64_t out = ((int64_t(b) * p.seq + key[i]) * p.heads_q + h) * D + 2 * quad;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      *reinterpret_cast<float2*>(p.dk + out + 8 * d) = make_float2(dk[d][2 * i] * p.scale, dk[d][2 * i + 1] * p.scale);
      *reinterpret_cast<float2*>(p.dv + out + 8 * d) = make_float2(dv[d][2 * i], dv[d][2 * i + 1]);
    }
  }
}

}  // namespace dash
