// Forward of dash_kernels.mixed_attention, FlashAttention-2 style mainloop (DASH_CUDA_FWD=mma selects it; see
// fwd.cu). The same walk as fwd_kernel.cuh: key tiles from the diagonal backward, one online-softmax state per
// row, band sub-steps per key tile, snapshots of O_c / LSE_c as the walk leaves each window, the sink pass and its
// log-sum-exp merge, Y = sum_c w[h, c] O_c in registers; the same outputs (O [C, B, T, Hq, D] in the input dtype,
// LSE [B, Hq, C, T] fp32 base 2, the sink scratch protocol), so the backward and the Python side are unchanged.
//
// What differs is the mainloop: mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate) through inline PTX, with
// the operands read by ldmatrix (.trans for V) from padded shared tiles, and S = Q K^T, the probabilities, the
// per-row max and sum, and the O accumulator all in registers: P is rounded to 16 bits in registers and used as
// the A operand of the P V product directly (the C fragment of m16n8k16 is, pair by pair, the A fragment of the
// next product). 8 warps, each owning 16 query rows of a 128-row tile; 64-key tiles, K and V double-buffered by
// cp.async (the next tile's loads fly while this one is computed: one wait and one block barrier a tile).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit A/B and f32 C), g = lane / 4, q = lane % 4:
//   A (16 x 16, row-major): a[0] = (row g, cols 2q, 2q+1), a[1] = (row g+8, same cols), a[2] = (row g, cols
//     2q+8, 2q+9), a[3] = (row g+8, cols 2q+8, 2q+9); lower column in the lower 16 bits.
//   B (16 x 8, "col"):      b[0] = (k 2q, 2q+1; n g), b[1] = (k 2q+8, 2q+9; n g).
//   C (16 x 8, f32):        c[0], c[1] = (row g, cols 2q, 2q+1), c[2], c[3] = (row g+8, cols 2q, 2q+1).
// So this thread holds rows g and g + 8 of its warp's 16 (index i = 0, 1 below: c[2 i], c[2 i + 1]), and the
// four threads of a quad (lanes 4g .. 4g+3) share a row: row reductions are two __shfl_xor_sync (1, 2).
#pragma once

#include "fwd_kernel.cuh"

#include <cstdint>
#include <type_traits>

namespace dash {

template <int D>
struct FwdMmaTile {
  static constexpr int kBlockM = 128;  // query rows per block: 8 warps x 16
  static constexpr int kBlockN = 64;   // keys per tile
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = D + 8;  // row pitch (elements) of every 16-bit tile: rows 16 B apart modulo 128 B,
                                     // so the 8 row addresses of an ldmatrix hit 8 distinct bank groups
  static constexpr int kScoreTiles = kBlockN / 8;  // n8 tiles of S a warp holds
  static constexpr int kOutTiles = D / 8;          // n8 tiles of O (and Y) a warp holds
  static constexpr size_t kQBytes = size_t(kBlockM) * kLd * 2;
  static constexpr size_t kKVBytes = size_t(kBlockN) * kLd * 2;  // one K or V tile
  // Y = sum_c w_c O_c: in registers at D 64; at D 128 (64 more floats a thread beside acc's 64 and S's 32) in
  // shared memory, each thread's own C-fragment elements (touched only when a candidate's output lands)
  static constexpr bool kYShared = D > 64;
  static constexpr size_t kYBytes = kYShared ? size_t(kBlockM) * D * 4 : 0;
  // Q, K and V of two stages, Y: 169,984 B at D 128, 55,296 B at D 64
  static constexpr size_t kSmemBytes = kQBytes + 4 * kKVBytes + kYBytes;
};

namespace mma16 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; lanes 8 m .. 8 m + 7 give the row addresses of matrix m, and register m of every
// lane receives (row lane / 4, elements 2 (lane % 4), +1) of matrix m (transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b: one m16n8k16 product, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "bf16 or fp16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to nearest as T, ``lo`` in the lower 16 bits (cvt puts its first source in the upper half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// 2^x by one MUFU.EX2, results below 2^-126 flushed to 0 (as FlashAttention's exp2f under --use_fast_math): exp2f
// adds a range test and two multiplies around it to return denormals, about a fifth of the sm90 forward's
// plain-tile loop (ncu, session 19); a probability below 2^-126 of the row's largest is 0 to every output anyway.
// exp2_ftz(-inf) = 0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace mma16

// A candidate's output row from a thread's share of it, in the register-fragment mainloops (this one and the sm90
// one): ND pairs of adjacent columns of one query row; acc(d, k) reads element k of pair d of the fp32
// accumulator, wherever the mainloop's fragment keeps it. Base-2 log-sum-exps throughout.
namespace frag_rows {

// The online softmax's row as it stands: O = acc / l into value; returns LSE = m + log2 l.
template <int ND, typename Acc>
__device__ __forceinline__ float finish(float (&value)[ND][2], Acc acc, float m, float l) {
  const float inv_l = 1.f / l;
  const float lse = m + log2f(l);
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    value[d][0] = acc(d, 0) * inv_l;
    value[d][1] = acc(d, 1) * inv_l;
  }
  return lse;
}

// A sink candidate's row: its window's part (the snapshot: window(d) the fp32 pair d, LSE lse_w) merged with the
// online state over its sink keys outside the window (acc, m, l; l == 0: no such key) into value; returns its LSE.
template <int ND, typename Window, typename Acc>
__device__ __forceinline__ float merge_sink(float (&value)[ND][2], Window window, float lse_w, Acc acc, float m,
                                            float l) {
  if (l > 0.f) {
    const float top_m = fmaxf(lse_w, m);
    const float a = exp2f(lse_w - top_m), bs = exp2f(m - top_m);
    const float total_w = a + l * bs;
    const float inv = 1.f / total_w;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      const float2 w2 = window(d);
      value[d][0] = (w2.x * a + acc(d, 0) * bs) * inv;
      value[d][1] = (w2.y * a + acc(d, 1) * bs) * inv;
    }
    return top_m + log2f(total_w);
  }
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    const float2 w2 = window(d);
    value[d][0] = w2.x;
    value[d][1] = w2.y;
  }
  return lse_w;
}

}  // namespace frag_rows

// S[16 rows of this warp, 64 keys] = Q K^T (unscaled, fp32) in C fragments: s[n][.] covers keys 8 n .. 8 n + 7.
// q_addr: shared address of this lane's ldmatrix row of Q (row 16 warp + 8 ((lane / 8) % 2) + lane % 8, column
// 8 (lane / 16)); k_addr: that of K (key 8 (lane / 16) + lane % 8, column 8 ((lane / 8) % 2)).
template <typename T, int D>
__device__ __forceinline__ void mma_scores(float (&s)[FwdMmaTile<D>::kScoreTiles][4], uint32_t q_addr,
                                           uint32_t k_addr) {
  using Tile = FwdMmaTile<D>;
#pragma unroll
  for (int n = 0; n < Tile::kScoreTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    // matrices: rows 0-7 / 8-15 of the warp's 16 at columns 16 kk + 0-7 (a[0], a[1]), then + 8-15 (a[2], a[3])
    mma16::ldmatrix_x4(a, q_addr + kk * 16 * 2);
#pragma unroll
    for (int np = 0; np < Tile::kBlockN / 16; ++np) {
      uint32_t b[4];
      // matrices: keys 16 np + 0-7 at d 16 kk + 0-7 / 8-15 (tile 2 np: b[0], b[1]), keys 16 np + 8-15 likewise
      mma16::ldmatrix_x4(b, k_addr + (np * 16 * Tile::kLd + kk * 16) * 2);
      mma16::mma<T>(s[2 * np], a, b[0], b[1]);
      mma16::mma<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// One sub-step of the walk for this thread's two rows: take in the keys of the current tile that
// ``include(i, j)`` admits (i: row 0 / 1 of this thread, j: key index), one running max per row; acc += P V.
// MASKED false: every element is admitted (the caller has checked that the band covers the warp's whole block).
// v_addr: shared address of this lane's ldmatrix.trans row of V (key 8 ((lane / 8) % 2) + lane % 8, column
// 8 (lane / 16)).
template <typename T, int D, bool MASKED, typename Include>
__device__ __forceinline__ void mma_softmax_step(const float (&s)[FwdMmaTile<D>::kScoreTiles][4],
                                                 float (&acc)[FwdMmaTile<D>::kOutTiles][4], float (&m)[2],
                                                 float (&l)[2], uint32_t v_addr, int key0, float scale_log2,
                                                 Include include) {
  using Tile = FwdMmaTile<D>;
  constexpr int NS = Tile::kScoreTiles;
  // key of element (n, e): key0 + 8 n + (e & 1), key0 = j0 + 2 (lane % 4); row i = e / 2
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < NS; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!MASKED || include(e >> 1, key0 + 8 * n + (e & 1))) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e] * scale_log2);
  float m_new[2], alpha[2], sum[2] = {0.f, 0.f};
  bool empty[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m_new[i] = fmaxf(m[i], mma16::quad_max(mx[i]));
    empty[i] = m_new[i] == -INFINITY;  // nothing taken in yet, nor now
    alpha[i] = empty[i] ? 1.f : exp2f(m[i] - m_new[i]);
  }
  // P, rounded to T, straight into the A fragments of P V: keys 16 kk .. 16 kk + 15 are score tiles 2 kk, 2 kk + 1
  uint32_t pa[Tile::kBlockN / 16][4];
#pragma unroll
  for (int kk = 0; kk < Tile::kBlockN / 16; ++kk) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int n = 2 * kk + half;
      float pv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        float pe = 0.f;
        if (!empty[i] && (!MASKED || include(i, key0 + 8 * n + (e & 1))))
          pe = exp2f(fmaf(s[n][e], scale_log2, -m_new[i]));
        sum[i] += pe;
        pv[e] = pe;
      }
      pa[kk][2 * half] = mma16::pack2<T>(pv[0], pv[1]);      // row g,     keys 8 n + 2q, +1
      pa[kk][2 * half + 1] = mma16::pack2<T>(pv[2], pv[3]);  // row g + 8, the same keys
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] = l[i] * alpha[i] + mma16::quad_sum(sum[i]);
    m[i] = m_new[i];
  }
#pragma unroll
  for (int d = 0; d < Tile::kOutTiles; ++d) {  // x * 1 == x: unchanged rows stay exact
    acc[d][0] *= alpha[0];
    acc[d][1] *= alpha[0];
    acc[d][2] *= alpha[1];
    acc[d][3] *= alpha[1];
  }
#pragma unroll
  for (int kk = 0; kk < Tile::kBlockN / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b[4];
      // matrices (transposed): keys 16 kk + 0-7 / 8-15 at d 16 np + 0-7 (tile 2 np: b[0], b[1]), then d + 8-15
      mma16::ldmatrix_x4_trans(b, v_addr + (kk * 16 * Tile::kLd + np * 16) * 2);
      mma16::mma<T>(acc[2 * np], pa[kk], b[0], b[1]);
      mma16::mma<T>(acc[2 * np + 1], pa[kk], b[2], b[3]);
    }
  }
}

// The key tiles a block of query rows [m0, m0 + BM) loads, in this order: the walk, from the tile of its last row
// down to the lowest tile any candidate sees, then each sink candidate's sink tiles, in candidate order. The mma
// and sm90 forwards step through it by index (their loads are issued a tile ahead; sm90's TMA producer walks it).
template <int BM, int BN>
struct KeyTiles {
  const FwdParams& p;
  int top, bottom, total;  // the walk: tiles top down to bottom; total: every tile, sink tiles included
  int widest;              // the widest finite window (1 where there is none)

  __device__ __forceinline__ KeyTiles(const FwdParams& params, int m0) : p(params) {
    const int last_row = min(m0 + BM, p.seq) - 1;
    widest = p.num_edges ? p.edges[p.num_edges - 1] : 1;
    const int lowest_key = p.has_full ? 0 : max(0, m0 - widest + 1);
    top = last_row / BN;
    bottom = lowest_key / BN;
    total = top - bottom + 1;
    for (int c = 0; c < p.num_c; ++c) total += sink_tiles(c);
  }
  // candidate c's sink tiles (0 without sinks)
  __device__ __forceinline__ int sink_tiles(int c) const {
    return min((p.sinks[c] + BN - 1) / BN, (p.seq + BN - 1) / BN);
  }
  // the key tile loaded at this step
  __device__ __forceinline__ int at(int step) const {
    const int n_walk = top - bottom + 1;
    if (step < n_walk) return top - step;
    step -= n_walk;
    for (int c = 0; c < p.num_c; ++c) {
      const int n = sink_tiles(c);
      if (step < n) return step;
      step -= n;
    }
    return 0;  // not reached
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdMmaTile<D>::kThreads, 1) mixed_attention_fwd_mma_kernel(const FwdParams p) {
  using Tile = FwdMmaTile<D>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, LD = Tile::kLd;
  constexpr int NS = Tile::kScoreTiles, ND = Tile::kOutTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + BM * LD;  // stage s: K at sKV + 2 s BN LD, V right after it

  // the longest walks (the last query tiles) first, so that the short ones fill the last wave
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int quad = lane & 3;
  const int wr0 = m0 + 16 * warp;  // the warp's first row
  const bool warp_live = wr0 < p.seq;
  const bool warp_rows_full = wr0 + 15 < p.seq;
  const int w_last = min(wr0 + 15, p.seq - 1);
  int t[2];  // this thread's rows (C fragment rows g and g + 8)
  bool row_ok[2];
  t[0] = wr0 + (lane >> 2);
  t[1] = t[0] + 8;
  row_ok[0] = t[0] < p.seq;
  row_ok[1] = t[1] < p.seq;
  const int C = p.num_c;
  T* o = static_cast<T*>(p.o);
  T* y = static_cast<T*>(p.y);
  const int64_t row_elems = int64_t(p.heads_q) * D;  // one token's row of y / o
  const int64_t o_plane = int64_t(p.batch) * p.seq * row_elems;
  int64_t out_row[2], lse_row[2];  // + 8 d: this thread's columns 8 d + 2 q, +1 of its rows
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    out_row[i] = (int64_t(b) * p.seq + t[i]) * row_elems + int64_t(h) * D + 2 * quad;
    lse_row[i] = (int64_t(bh) * C) * p.seq + t[i];  // + c * seq
  }

  // ldmatrix row addresses of this lane (see mma_scores, mma_softmax_step)
  const int mat_lo = (lane >> 3) & 1, mat_hi = lane >> 4, r8 = lane & 7;
  const uint32_t q_addr = mma16::smem_u32(sQ + (16 * warp + 8 * mat_lo + r8) * LD + 8 * mat_hi);
  const uint32_t kv_base = mma16::smem_u32(sKV);
  const uint32_t k_lane = ((8 * mat_hi + r8) * LD + 8 * mat_lo) * 2;  // bytes from a K tile's start
  const uint32_t v_lane = ((8 * mat_lo + r8) * LD + 8 * mat_hi) * 2;  // from a V tile's start
  constexpr uint32_t kStageBytes = 2 * Tile::kKVBytes;

  const KeyTiles<BM, BN> tiles(p, m0);  // what this block loads, in order
  auto issue_tile = [&](int step) {
    const int j0 = tiles.at(step) * BN;
    T* sK = sKV + (step & 1) * 2 * BN * LD;
    load_rows_async<T, D, BN, LD, Tile::kThreads>(sK, k, p.k_stride[1], j0, p.seq);
    load_rows_async<T, D, BN, LD, Tile::kThreads>(sK + BN * LD, v, p.v_stride[1], j0, p.seq);
  };
  // Q and the first tile together; then, at each tile: wait for it, barrier (everyone's copies have landed, and
  // everyone is done with the other stage), issue the next tile into the other stage, compute this one.
  load_rows_async<T, D, BM, LD, Tile::kThreads>(sQ, q, p.q_stride[1], m0, p.seq);
  issue_tile(0);
  int step = 0;
  auto begin_tile = [&]() -> uint32_t {  // returns the shared address of this tile's K (V: + kKVBytes)
    cp_async_wait_all();
    __syncthreads();
    if (step + 1 < tiles.total) issue_tile(step + 1);
    const uint32_t stage = kv_base + (step & 1) * kStageBytes;
    ++step;
    return stage;
  };

  float acc[ND][4], m[2], l[2];
  auto reset_state = [&]() {
#pragma unroll
    for (int d = 0; d < ND; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  };
  reset_state();
  // Y = sum_c w_c O_c in the C fragment layout of acc: registers, or (kYShared) this thread's float4 per n8 tile
  // at sY[(warp ND + d) 32 + lane] (consecutive lanes, consecutive 16 B: no bank conflicts)
  constexpr bool kYShared = Tile::kYShared;
  float y_acc[kYShared ? 1 : ND][4];
  float4* sY = reinterpret_cast<float4*>(smem + Tile::kQBytes + 4 * Tile::kKVBytes) + warp * ND * 32 + lane;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    if constexpr (kYShared) sY[d * 32] = make_float4(0.f, 0.f, 0.f, 0.f);
    else y_acc[d][0] = y_acc[d][1] = y_acc[d][2] = y_acc[d][3] = 0.f;
  }

  // Candidate c's output for row i of this thread: O (input dtype), Y += w O, LSE (one thread of the quad).
  auto emit = [&](int c, int i, const float (&value)[ND][2], float lse) {
    T* dst = o + c * o_plane + out_row[i];  // 4-byte aligned: out_row is even
    const float wc = p.w[h * C + c];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      if constexpr (kYShared) {
        float2* ys = reinterpret_cast<float2*>(sY + d * 32) + i;  // row i's pair
        float2 cur = *ys;
        cur.x += wc * value[d][0];
        cur.y += wc * value[d][1];
        *ys = cur;
      } else {
        y_acc[d][2 * i] += wc * value[d][0];
        y_acc[d][2 * i + 1] += wc * value[d][1];
      }
      *reinterpret_cast<uint32_t*>(dst + 8 * d) = mma16::pack2<T>(value[d][0], value[d][1]);
    }
    if (quad == 0) p.lse[lse_row[i] + int64_t(c) * p.seq] = lse;
  };
  // Snapshots every candidate of window ``window`` whose lowest key, for row i, lies in the tile at j0.
  auto snapshot = [&](int window, int j0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      const int lo = window >= kFullWindow ? 0 : max(0, t[i] - window + 1);
      if (lo < j0 || lo >= j0 + BN) continue;
      float value[ND][2];
      const float lse = frag_rows::finish(value, [&](int d, int k) { return acc[d][2 * i + k]; }, m[i], l[i]);
      for (int c = 0; c < C; ++c) {
        if (p.windows[c] != window) continue;
        if (p.sinks[c] > 0) {  // fp32 scratch until its sink keys are merged in
          float* dst = p.sink_o + c * o_plane + out_row[i];  // 8-byte aligned
#pragma unroll
          for (int d = 0; d < ND; ++d) *reinterpret_cast<float2*>(dst + 8 * d) = make_float2(value[d][0], value[d][1]);
          if (quad == 0) p.sink_lse[lse_row[i] + int64_t(c) * p.seq] = lse;
        } else {
          emit(c, i, value, lse);
        }
      }
    }
  };

  float s[NS][4];
  // The walk: from the tile holding the last query's diagonal down to the lowest key any window needs.
  for (int kb = tiles.top; kb >= tiles.bottom; --kb) {
    const int j0 = kb * BN;
    const uint32_t k_tile = begin_tile();
    const uint32_t v_addr = k_tile + uint32_t(Tile::kKVBytes) + v_lane;
    // distances t - j this tile spans over the warp's rows (warp-uniform)
    const int d_min = wr0 - (j0 + BN - 1), d_max = w_last - j0;
    const bool active = warp_live && d_max >= 0 && (p.has_full || d_min < tiles.widest);
    if (active) mma_scores<T, D>(s, q_addr, k_tile + k_lane);
    for (int band = 0; band <= p.num_edges; ++band) {
      const int lo = band == 0 ? 0 : p.edges[band - 1];
      const int hi = band < p.num_edges ? p.edges[band] : kFullWindow;
      if (band == p.num_edges && !p.has_full) break;
      if (active && d_max >= lo && d_min < hi) {
        const int key0 = j0 + 2 * quad;
        if (d_min >= lo && d_max < hi && j0 + BN <= p.seq && warp_rows_full) {
          mma_softmax_step<T, D, false>(s, acc, m, l, v_addr, key0, p.scale_log2, [](int, int) { return true; });
        } else {
          mma_softmax_step<T, D, true>(s, acc, m, l, v_addr, key0, p.scale_log2, [&](int i, int j) {
            const int dist = t[i] - j;
            return row_ok[i] && j < p.seq && dist >= lo && dist < hi;
          });
        }
      }
      snapshot(hi, j0);
    }
  }

  // Sink candidates: their sink keys outside the window, then the merge with the window snapshot.
  for (int c = 0; c < C; ++c) {
    const int sink = p.sinks[c];
    if (sink == 0) continue;
    const int window = p.windows[c];
    int limit[2];  // sink keys j < limit lie outside the window
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_ok[i] ? min(sink, max(0, t[i] - window + 1)) : 0;
    reset_state();
    const int n = tiles.sink_tiles(c);
    for (int kb = 0; kb < n; ++kb) {
      const int j0 = kb * BN;
      const uint32_t k_tile = begin_tile();
      // warp-uniform: does any row of the warp take a key of this tile?
      if (__any_sync(0xffffffffu, limit[0] > j0 || limit[1] > j0)) {
        mma_scores<T, D>(s, q_addr, k_tile + k_lane);
        mma_softmax_step<T, D, true>(s, acc, m, l, k_tile + uint32_t(Tile::kKVBytes) + v_lane, j0 + 2 * quad,
                                     p.scale_log2, [&](int i, int j) { return j < limit[i]; });
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      // written by this thread (O) and by lane 4 g of its quad (LSE), before the barriers of the sink tiles
      const float* window_out = p.sink_o + c * o_plane + out_row[i];
      float value[ND][2];
      const float lse = frag_rows::merge_sink(
          value, [&](int d) { return *reinterpret_cast<const float2*>(window_out + 8 * d); },
          p.sink_lse[lse_row[i] + int64_t(c) * p.seq], [&](int d, int k) { return acc[d][2 * i + k]; }, m[i], l[i]);
      emit(c, i, value, lse);
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    T* dst = y + out_row[i];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      float2 yv;
      if constexpr (kYShared) yv = reinterpret_cast<const float2*>(sY + d * 32)[i];
      else yv = make_float2(y_acc[d][2 * i], y_acc[d][2 * i + 1]);
      *reinterpret_cast<uint32_t*>(dst + 8 * d) = mma16::pack2<T>(yv.x, yv.y);
    }
  }
}

}  // namespace dash
