// Forward of dash_kernels.mixed_attention, Hopper (sm_90a) mainloop with CuTe wgmma (DASH_CUDA_FWD=sm90; see fwd.cu
// and fwd_sm90.cu). Only compiled where the CUTLASS/CuTe headers were found (DASH_WITH_SM90_CUTE, setup.py).
//
// The walk, the outputs and the sink protocol are those of fwd_mma_kernel.cuh (read its header): key tiles from
// the diagonal backward, one online-softmax state per row, band sub-steps per key tile (one running max per
// sub-step, one P V product per band against the same V tile), snapshots O_c = acc / l, LSE_c = m + log2 l as
// the walk leaves each window, the sink pass merged by log-sum-exp, Y = sum_c w[h, c] O_c; O [C, B, T, Hq, D] in
// the input dtype, LSE [B, Hq, C, T] fp32 base 2, the fp32 sink scratch. What differs:
//   - the products are warpgroup MMAs (wgmma) through CuTe's SM90 GMMA atoms: S = Q K^T with both operands in
//     shared memory (GMMA::ss_op_selector, K-major), O += P V with P from registers (GMMA::rs_op_selector, V^T
//     MN-major in shared memory);
//   - 128 query rows per block = 2 consumer warpgroups of 64 rows (one 64-row wgmma atom each: TiledMMA atom
//     layout 2 x 1 x 1), 64-key tiles, 256 threads (+ 128 for the TMA producer), one block per SM;
//   - Q, K and V live in 128B-swizzled shared layouts (GMMA::Layout_K_SW128_Atom for Q and K,
//     GMMA::Layout_MN_SW128_Atom for V^T, tiled by tile_to_shape), K / V in 3 stages;
//   - two ways to load K / V, one kernel template (kTma):
//     DASH_CUDA_FWD=sm90: cp.async by all 256 threads into the swizzled layouts (addresses from the CuTe smem
//       tensors), then fence.proxy.async (the wgmma reads through the async proxy) and one block barrier per key
//       tile, the next tile's loads in flight meanwhile;
//     DASH_CUDA_FWD=sm90tma: FA3's warp specialisation: a third (producer) warpgroup, registers given back by
//       setmaxnreg (24; consumers 240), one thread of which issues TMA loads (make_tma_copy on the host:
//       SM90_TMA_LOAD of K as (T, D, Hkv, B), of V through its transposed view (D, T, Hkv, B) into V^T) into a
//       3-stage cutlass::PipelineTmaAsync (full / empty mbarriers, both tiles on one barrier); the consumers
//       consumer_wait before a tile and consumer_release after its last product; Q by cp.async from the
//       consumers and a named barrier. sm90tma waits for each product where it is issued; DASH_CUDA_FWD=sm90overlap
//       (kOverlap) pipelines runs of plain tiles as FA3's IntraWGOverlap (the walk below), and
//       DASH_CUDA_FWD=sm90pingpong (kPingPong) adds FA3's warp-scheduler barriers between the two consumer
//       warpgroups; DASH_CUDA_FWD=sm90lean (kLean) is sm90overlap with fewer instructions per tile (below);
//   - every per-element mask and row statistic uses the accumulator's (row, col) mapping taken from CuTe
//     (partition_C of an identity tensor, viewed as (row, col) as FA3's convert_layout_acc_rowcol does): each
//     thread holds 2 rows of its warpgroup's 64 and, per row, BN / 4 (S) or D / 4 (O) columns in pairs; the 4
//     threads of a quad (lanes 4g .. 4g + 3) share a row, so row reductions are two __shfl_xor_sync (1, 2).
// Warpgroup-collective: a wgmma is issued by all 128 threads of a warpgroup or none, so every decision that
// guards a product (is the tile active, which band sub-steps run, the sink tiles) is made per warpgroup.
#pragma once

#include "fwd_mma_kernel.cuh"  // FwdParams, head_view, cp_async_16, cp_async_wait_all, mma16::quad_max / quad_sum
#include "fwd_sm90_tile.h"

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cstdint>
#include <type_traits>

namespace dash {
namespace sm90 {

using namespace cute;

template <typename T>
struct CuteType;
template <>
struct CuteType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteType<__half> {
  using type = cutlass::half_t;
};

template <typename T, int D>
struct Traits {
  using Tile = FwdSm90Tile<D>;
  using Element = typename CuteType<T>::type;
  static constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, kStages = Tile::kStages;
  using TileQK = Shape<Int<BM>, Int<BN>, Int<D>>;
  using TilePV = Shape<Int<BM>, Int<D>, Int<BN>>;
  using AtomLayout = Layout<Shape<_2, _1, _1>>;  // one 64-row atom per warpgroup
  using TiledMmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileQK>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<BM>, Int<D>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<BN>, Int<D>, Int<kStages>>{}));
  // V^T (d, key, stage), d contiguous: the MN-major B operand of P V (FA3's SmemLayoutVt for a row-major V)
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<D>, Int<BN>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  static constexpr size_t kQElems = cosize_v<SmemLayoutQ>;
  static constexpr size_t kKElems = cosize_v<SmemLayoutK>;
  static constexpr size_t kVElems = cosize_v<SmemLayoutVt>;
  static_assert(kQElems * 2 == Tile::kQBytes, "Q tile size (fwd_sm90_tile.h)");
  static_assert(kKElems * 2 == kStages * Tile::kKVBytes && kVElems * 2 == kStages * Tile::kKVBytes,
                "K / V tile sizes (fwd_sm90_tile.h)");
  static_assert(size(TiledMmaQK{}) == Tile::kThreads && size(TiledMmaPV{}) == Tile::kThreads, "2 warpgroups");

  // TMA (DASH_CUDA_FWD=sm90tma): K as (T, D, Hkv, B) into one stage of SmemLayoutK; V as its transposed view
  // (D, T, Hkv, B) into one stage of SmemLayoutVt (FA3's V^t). Built on the host (fwd_sm90.cu); out-of-range rows
  // (t >= T) read as zeros.
  static auto make_tma_k(const Element* ptr, int seq, int heads_kv, int batch, int64_t st, int64_t sh, int64_t sb) {
    Tensor m = make_tensor(make_gmem_ptr(ptr), make_shape(seq, Int<D>{}, heads_kv, batch), make_stride(st, _1{}, sh, sb));
    return make_tma_copy(SM90_TMA_LOAD{}, m, take<0, 2>(SmemLayoutK{}));
  }
  static auto make_tma_v(const Element* ptr, int seq, int heads_kv, int batch, int64_t st, int64_t sh, int64_t sb) {
    Tensor m = make_tensor(make_gmem_ptr(ptr), make_shape(Int<D>{}, seq, heads_kv, batch), make_stride(_1{}, st, sh, sb));
    return make_tma_copy(SM90_TMA_LOAD{}, m, take<0, 2>(SmemLayoutVt{}));
  }
  using TmaK = decltype(make_tma_k(nullptr, 1, 1, 1, 1, 1, 1));
  using TmaV = decltype(make_tma_v(nullptr, 1, 1, 1, 1, 1, 1));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static_assert(sizeof(typename Pipeline::SharedStorage) <= Tile::kPipelineBytes, "pipeline barriers");
  static constexpr uint32_t kTmaBytes = 2 * uint32_t(Tile::kKVBytes);  // K and V of one tile, one barrier
};

struct NoTma {};  // the cp.async variant's placeholder for the TMA descriptors

// The wgmma accumulator's per-thread layout ((2, 2, N / 8), MMA_M, MMA_N) viewed as (row, col): rows (2, MMA_M),
// cols (2, N / 8, MMA_N) (FA3's convert_layout_acc_rowcol, SM90 branch).
template <typename L>
CUTE_HOST_DEVICE auto acc_rowcol(L l) {
  static_assert(decltype(rank<0>(l))::value == 3 && decltype(rank(l))::value == 3, "a GMMA accumulator layout");
  static_assert(decltype(size<0, 0>(l))::value == 2 && decltype(size<0, 1>(l))::value == 2, "pairs, 2 rows");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same accumulator registers viewed as the A operand (16-bit) of the next product: ((2, 2, 2), MMA_M,
// N / 16) (FA3's convert_layout_acc_Aregs, SM90 branch, 16-bit A).
template <typename L>
CUTE_HOST_DEVICE auto acc_as_a(L l) {
  auto split = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(split)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(split), get<2>(l))));
}

// One warpgroup product c (+)= a b over the K mode, issued and committed as one wgmma group, not waited for (FA3's
// flash::gemm<zero_init, -1>): the caller waits with wg_wait, and touches neither c nor (from registers) a before.
template <bool kZeroInit, typename Mma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void wg_gemm_issue(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRS = !std::is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRS) warpgroup_fence_operand(const_cast<TA&>(a));
}

// Waits until at most kPending of this warpgroup's committed wgmma groups are in flight (they complete in order),
// then pins the registers the completed ones wrote or read, so that no access to them moves above the wait.
template <int kPending, typename... Ts>
__device__ __forceinline__ void wg_wait(Ts&... operands) {
  warpgroup_wait<kPending>();
  (warpgroup_fence_operand(operands), ...);
}

// One warpgroup product, waited for (FA3's flash::gemm<zero_init, 0>).
template <bool kZeroInit, typename Mma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  wg_gemm_issue<kZeroInit>(mma, a, b, c);
  constexpr bool kRS = !std::is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  if constexpr (kRS) wg_wait<0>(c, const_cast<TA&>(a));
  else wg_wait<0>(c);
}

}  // namespace sm90

// kTma false: 256 threads (2 consumer warpgroups) issue the K / V loads by cp.async themselves; kTma true: 384
// threads, warpgroup 2 the producer (one thread issuing TMA loads into a 3-stage PipelineTmaAsync, registers
// given back by setmaxnreg), warpgroups 0 and 1 the consumers (registers raised to 240).
// kLean (DASH_CUDA_FWD=sm90lean, on the overlapped walk; from the SASS of sm90overlap, benchmarks/NOTES.md sessions
// 19-20): a run of plain tiles ends where computed once, not by plain_band per tile; each row's max is taken on the
// raw scores and scaled once (the same value for scale > 0, which the launcher requires: rounding is monotonic);
// O is rescaled only where some row of the warp moved its max (alpha exactly 1 otherwise); no empty-row test
// around each exponential (an admitted element makes its row's max finite).
template <typename T, int D, bool kTma, bool kOverlap, bool kPingPong, bool kLean, typename TmaK, typename TmaV>
__global__ void __launch_bounds__(kTma ? FwdSm90Tile<D>::kThreadsTma : FwdSm90Tile<D>::kThreads, 1)
    mixed_attention_fwd_sm90_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ TmaK tma_k,
                                    const __grid_constant__ TmaV tma_v) {
#if defined(__CUDA_ARCH__) && !defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  __trap();  // built for another architecture: the launcher refuses before this (fwd_sm90.cu)
#else
  using namespace cute;
  using Tr = sm90::Traits<T, D>;
  using Tile = FwdSm90Tile<D>;
  static_assert(kTma || !kOverlap, "the overlapped walk holds stages across tiles: the TMA pipeline's release");
  static_assert(kOverlap || !kPingPong, "the ping-pong schedules the overlapped walk's products");
  static_assert(kOverlap || !kLean, "the lean walk is the overlapped one");
  using Element = typename Tr::Element;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, NT = Tile::kThreads;  // NT: the consumers
  constexpr int ND = D / 8;  // column pairs of O a thread holds per row (D / 4 columns)
  [[maybe_unused]] constexpr uint32_t kBarSched = 2;  // kPingPong's named barriers: 2 + warpgroup (1: the Q load)

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // the 128B swizzle is a function of the address bits: every tile starts 1024-byte aligned
  const uint32_t pad = (1024u - (mma16::smem_u32(smem_raw) & 1023u)) & 1023u;
  Element* q_ptr = reinterpret_cast<Element*>(smem_raw + pad);
  Element* k_ptr = q_ptr + Tr::kQElems;
  Element* vt_ptr = k_ptr + Tr::kKElems;
  Tensor sQ = make_tensor(make_smem_ptr(q_ptr), typename Tr::SmemLayoutQ{});     // (BM, D)
  Tensor sK = make_tensor(make_smem_ptr(k_ptr), typename Tr::SmemLayoutK{});     // (BN, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(vt_ptr), typename Tr::SmemLayoutVt{});  // (D, BN, stage)

  // the longest walks (the last query tiles) first, so that the short ones fill the last wave
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int bh = blockIdx.y;
  const auto [b, h, q, k, v] = head_view<T>(p, bh);
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  using Pipeline = typename Tr::Pipeline;
  using PipelineState = cutlass::PipelineState<Tile::kStages>;
  auto* pipeline_storage = reinterpret_cast<typename Pipeline::SharedStorage*>(
      reinterpret_cast<unsigned char*>(vt_ptr + Tr::kVElems) + Tile::kYBytes);

  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // descriptors: (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<D>>{});
  Tensor S = make_tensor(tSrS.data(), sm90::acc_rowcol(tSrS.layout()));  // (2 rows, BN / 4 cols)
  Tensor O = make_tensor(tOrO.data(), sm90::acc_rowcol(tOrO.layout()));  // (2 rows, D / 4 cols)
  // the (row, col) of each accumulator element, from CuTe: identity tensors partitioned as the accumulators
  Tensor cS_part = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor cO_part = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor cS = make_tensor(cS_part.data(), sm90::acc_rowcol(cS_part.layout()));
  Tensor cO = make_tensor(cO_part.data(), sm90::acc_rowcol(cO_part.layout()));
  constexpr int NC = decltype(size<1>(S))::value;
  static_assert(decltype(size<0>(S))::value == 2 && decltype(size<0>(O))::value == 2, "2 rows a thread");
  static_assert(decltype(size<1>(O))::value == 2 * ND, "D / 4 columns of O a row");

  const int wr0 = m0 + 64 * wg;  // the warpgroup's first row
  const bool wg_live = wr0 < p.seq;
  const bool wg_rows_full = wr0 + 63 < p.seq;
  const int w_last = min(wr0 + 63, p.seq - 1);
  int t[2];  // this thread's rows
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    t[i] = m0 + int(get<0>(cS(i, 0)));
    row_ok[i] = t[i] < p.seq;
  }
  // the thread holding column 0 of a row writes its LSE (one of the 4 threads sharing the row)
  const bool lse_writer = int(get<1>(cO(0, 0))) == 0;
  const int C = p.num_c;
  T* o = static_cast<T*>(p.o);
  T* y = static_cast<T*>(p.y);
  const int64_t row_elems = int64_t(p.heads_q) * D;  // one token's row of y / o
  const int64_t o_plane = int64_t(p.batch) * p.seq * row_elems;
  // + column: this thread's elements of row i (computed where used: fewer registers live across the walk)
  auto out_row = [&](int i) { return (int64_t(b) * p.seq + t[i]) * row_elems + int64_t(h) * D; };
  auto lse_row = [&](int i) { return (int64_t(bh) * C) * p.seq + t[i]; };  // + c * seq
  // column of O pair d (elements 2 d, 2 d + 1 of a row: adjacent columns), the same for both rows
  auto o_col = [&](int d) { return int(get<1>(cO(0, 2 * d))); };

  const KeyTiles<BM, BN> tiles(p, m0);  // what this block loads, in order
  // always_inline: called as a function, the body would keep the kernel's 168-register budget (not the 240 that
  // setmaxnreg gives the consumers) and its accumulators on the stack (seen at D 128)
  auto consumer_body = [&](auto& pipeline) __attribute__((always_inline)) {
    constexpr bool kUsesTma = !std::is_same_v<std::decay_t<decltype(pipeline)>, sm90::NoTma>;
  auto issue_tile = [&](int step) {
    const int j0 = tiles.at(step) * BN;
    const int stage = step % Tile::kStages;
    load_rows_to<T, D, BN, NT>([&](int r, int c) { return static_cast<void*>(&sK(r, c, stage)); }, k,
                               p.k_stride[1], j0, p.seq);
    load_rows_to<T, D, BN, NT>([&](int r, int c) { return static_cast<void*>(&sVt(c, r, stage)); }, v,
                               p.v_stride[1], j0, p.seq);
  };
  // cp.async: Q and the first tile together; then, at each tile: wait for this thread's copies, make them visible
  // to the async proxy (wgmma reads shared memory through it), barrier (everyone's copies have landed, and every
  // warpgroup's products on the other stage have completed: each product is waited for), issue the next tile
  // into the other stage, compute this one.
  // TMA: Q by cp.async from the consumers (one named barrier among their 256 threads), then at each tile: wait on
  // the stage's full barrier (both loads landed), compute, release the stage to the producer (end_tile: every
  // product on it has been waited for).
  load_rows_to<T, D, BM, NT>([&](int r, int c) { return static_cast<void*>(&sQ(r, c)); }, q,
                             p.q_stride[1], m0, p.seq);
  [[maybe_unused]] PipelineState read_state, release_state;  // the next tile to wait for, the next to release
  if constexpr (kUsesTma) {
    cp_async_wait_all();
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(NT, 1);  // id 1: the consumers only (0 is __syncthreads')
    if constexpr (kPingPong) {  // warpgroup 0 issues first
      if (wg == 1) cutlass::arch::NamedBarrier::arrive(NT, kBarSched + 0);
    }
  } else {
    issue_tile(0);
  }
  int step = 0;
  auto begin_tile = [&]() -> int {  // returns this tile's stage
    if constexpr (kUsesTma) {
      pipeline.consumer_wait(read_state);
      const int stage = int(read_state.index());
      ++read_state;
      return stage;
    } else {
      cp_async_wait_all();
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
      if (step + 1 < tiles.total) issue_tile(step + 1);
      return step++ % Tile::kStages;
    }
  };
  // gives the oldest held stage back to the producer (tiles are released in the order they were waited for)
  auto end_tile = [&]() {
    if constexpr (kUsesTma) {
      pipeline.consumer_release(release_state);
      ++release_state;
    }
  };

  float m[2], l[2];
  auto reset_state = [&]() {
    clear(tOrO);
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  };
  reset_state();
  // Y = sum_c w_c O_c in O's (row, col) layout: registers, or (kYShared) this thread's float4 per column pair d
  // (rows 0 and 1) at sY[d NT + tid] (consecutive threads, consecutive 16 B: no bank conflicts)
  constexpr bool kYShared = Tile::kYShared;
  [[maybe_unused]] float y_acc[kYShared ? 1 : ND][4];
  [[maybe_unused]] float4* sY = reinterpret_cast<float4*>(vt_ptr + Tr::kVElems) + tid;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    if constexpr (kYShared) sY[d * NT] = make_float4(0.f, 0.f, 0.f, 0.f);
    else y_acc[d][0] = y_acc[d][1] = y_acc[d][2] = y_acc[d][3] = 0.f;
  }

  // P, rounded to 16 bits in S's register layout; viewed as the A operand of P V (tOrP)
  Tensor tSrP = make_tensor_like<Element>(tSrS);
  Tensor P = make_tensor(tSrP.data(), sm90::acc_rowcol(tSrP.layout()));
  Tensor tOrP = make_tensor(tSrP.data(), sm90::acc_as_a(tSrP.layout()));

  // The softmax of one sub-step of the walk for this thread's two rows: the probabilities of the keys of the current
  // tile (keys j0 ..) that ``include(i, j)`` admits, 0 elsewhere; one running max per row; l updated; alpha: the
  // factor O must be rescaled by before this sub-step's P V is added to it. kMasked false: every element is admitted
  // (the caller has checked that the band covers the warpgroup's whole block). kToP: the probabilities go to P (16
  // bits) and S keeps the scores, as the serial walk needs (a tile spanning several bands runs one softmax per band
  // on the same S); else they overwrite S (fp32) and convert_p moves them to P later: the overlapped walk computes
  // a tile's softmax while the previous tile's P V still reads P.
  auto softmax_rows = [&](auto masked, auto to_p, int j0, auto include, float (&alpha)[2]) {
    constexpr bool kMasked = decltype(masked)::value, kToP = decltype(to_p)::value;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (!kMasked || include(i, j0 + int(get<1>(cS(i, c)))))
          mx[i] = fmaxf(mx[i], kLean ? S(i, c) : S(i, c) * p.scale_log2);  // kLean: scaled below, once
    float m_new[2], sum[2] = {0.f, 0.f};
    bool empty[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      m_new[i] = fmaxf(m[i], kLean ? mma16::quad_max(mx[i]) * p.scale_log2 : mma16::quad_max(mx[i]));
      empty[i] = m_new[i] == -INFINITY;  // nothing taken in yet, nor now
      if constexpr (kLean)  // exactly 1 where the max holds (most tiles of a long row): rescale_o skips them
        alpha[i] = empty[i] || m_new[i] == m[i] ? 1.f : mma16::exp2_ftz(m[i] - m_new[i]);
      else
        alpha[i] = empty[i] ? 1.f : mma16::exp2_ftz(m[i] - m_new[i]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        // kLean: no empty-row test (an admitted element makes its row's max finite): the unmasked path is then one
        // FFMA and one MUFU per element, without the predicated moves around them
        float pe = 0.f;
        if ((kLean || !empty[i]) && (!kMasked || include(i, j0 + int(get<1>(cS(i, c))))))
          pe = mma16::exp2_ftz(fmaf(S(i, c), p.scale_log2, -m_new[i]));
        sum[i] += pe;
        if constexpr (kToP) P(i, c) = static_cast<Element>(pe);
        else S(i, c) = pe;
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] = l[i] * alpha[i] + mma16::quad_sum(sum[i]);
      m[i] = m_new[i];
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
    // kLean: a warp none of whose rows moved its max skips the 2 D / 4 multiplies (a warp-uniform branch)
    if constexpr (kLean)
      if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < 2 * ND; ++c) O(i, c) *= alpha[i];  // x * 1 == x: unchanged rows stay exact
  };
  auto convert_p = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < NC; ++c) P(i, c) = static_cast<Element>(S(i, c));
  };
  // the band [lo, hi) of distances t - j of the tile at j0, as softmax_rows' mask (none where the band covers the
  // warpgroup's whole block: warpgroup-uniform)
  auto band_softmax = [&](auto to_p, int j0, int lo, int hi, int d_min, int d_max, float (&alpha)[2]) {
    if (d_min >= lo && d_max < hi && j0 + BN <= p.seq && wg_rows_full) {
      softmax_rows(std::false_type{}, to_p, j0, [](int, int) { return true; }, alpha);
    } else if constexpr (kLean) {
      // the same keys as a column range per row, [c_lo, c_hi) of this tile: j in [t - hi + 1, min(t - lo, T - 1)]
      // (two compares an element instead of four and their predicate logic; empty for rows t >= T)
      int c_lo[2], c_hi[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        c_lo[i] = t[i] - hi + 1 - j0;
        c_hi[i] = row_ok[i] ? min(t[i] - lo, p.seq - 1) + 1 - j0 : c_lo[i];
      }
      softmax_rows(std::true_type{}, to_p, j0, [&](int i, int j) {
        const int col = j - j0;
        return col >= c_lo[i] && col < c_hi[i];
      }, alpha);
    } else {
      softmax_rows(std::true_type{}, to_p, j0, [&](int i, int j) {
        const int dist = t[i] - j;
        return row_ok[i] && j < p.seq && dist >= lo && dist < hi;
      }, alpha);
    }
  };
  // One sub-step, every product waited for: the softmax, then O += P V against this tile's V.
  auto softmax_step = [&](auto masked, int j0, int stage, auto include) {
    float alpha[2];
    softmax_rows(masked, std::true_type{}, j0, include, alpha);
    rescale_o(alpha);
    sm90::wg_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
  };

  // Candidate c's output for row i of this thread: O (input dtype), Y += w O, LSE (one thread of the row).
  auto emit = [&](int c, int i, const float (&value)[ND][2], float lse) {
    T* dst = o + c * o_plane + out_row(i);
    const float wc = p.w[h * C + c];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      if constexpr (kYShared) {
        float2* ys = reinterpret_cast<float2*>(sY + d * NT) + i;  // row i's pair
        float2 cur = *ys;
        cur.x += wc * value[d][0];
        cur.y += wc * value[d][1];
        *ys = cur;
      } else {
        y_acc[d][2 * i] += wc * value[d][0];
        y_acc[d][2 * i + 1] += wc * value[d][1];
      }
      *reinterpret_cast<uint32_t*>(dst + o_col(d)) = mma16::pack2<T>(value[d][0], value[d][1]);  // even column
    }
    if (lse_writer) p.lse[lse_row(i) + int64_t(c) * p.seq] = lse;
  };
  // Snapshots every candidate of window ``window`` whose lowest key, for row i, lies in the tile at j0.
  auto snapshot = [&](int window, int j0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      const int lo = window >= kFullWindow ? 0 : max(0, t[i] - window + 1);
      if (lo < j0 || lo >= j0 + BN) continue;
      float value[ND][2];
      const float lse = frag_rows::finish(value, [&](int d, int k) { return O(i, 2 * d + k); }, m[i], l[i]);
      for (int c = 0; c < C; ++c) {
        if (p.windows[c] != window) continue;
        if (p.sinks[c] > 0) {  // fp32 scratch until its sink keys are merged in
          float* dst = p.sink_o + c * o_plane + out_row(i);  // 8-byte aligned: even columns
#pragma unroll
          for (int d = 0; d < ND; ++d)
            *reinterpret_cast<float2*>(dst + o_col(d)) = make_float2(value[d][0], value[d][1]);
          if (lse_writer) p.sink_lse[lse_row(i) + int64_t(c) * p.seq] = lse;
        } else {
          emit(c, i, value, lse);
        }
      }
    }
  };

  // kPingPong (FA3's warp-scheduler barriers): the two consumer warpgroups take turns to issue a tile's products,
  // so that one's softmax runs while the other's products do. Each warpgroup passes sched_sync and sched_arrive
  // exactly once per tile it waits for (the same tiles for both), whether it computes on the tile or not, so the
  // turns pair up; the last arrive of warpgroup 1 is left unmatched at exit.
  auto sched_sync = [&]() {
    if constexpr (kPingPong) {
      if (wg == 0) cutlass::arch::NamedBarrier::sync(NT, kBarSched);
      else cutlass::arch::NamedBarrier::sync(NT, kBarSched + 1);
    }
  };
  auto sched_arrive = [&]() {
    if constexpr (kPingPong) {
      if (wg == 0) cutlass::arch::NamedBarrier::arrive(NT, kBarSched + 1);
      else cutlass::arch::NamedBarrier::arrive(NT, kBarSched);
    }
  };

  // distances t - j the key tile kb spans over the warpgroup's rows (warpgroup-uniform)
  auto dist_min = [&](int kb) { return wr0 - (kb * BN + BN - 1); };
  auto dist_max = [&](int kb) { return w_last - kb * BN; };
  auto is_active = [&](int kb) { return wg_live && dist_max(kb) >= 0 && (p.has_full || dist_min(kb) < tiles.widest); };
  // kOverlap: a plain tile is active, lies in one band [lo, hi), and holds no snapshot: no row's window starts in
  // it (the lowest key t - w + 1 of a finite window w lies in [j0, j0 + BN) for no row; the full window's, key 0,
  // is not in it). A run of plain tiles is pipelined as FA3's IntraWGOverlap: each tile's P V is issued one tile
  // late, together with the next tile's Q K^T, and the next softmax runs while it does. Straight-line code per
  // tile (no branch on whether a product is in flight), so that ptxas keeps the wgmmas asynchronous.
  auto plain_band = [&](int kb, int& lo1, int& hi1) {
    if (!is_active(kb)) return false;
    const int j0 = kb * BN, d_min = dist_min(kb), d_max = dist_max(kb);
    int bands = 0;
    bool snaps = j0 == 0;
    for (int band = 0; band <= p.num_edges; ++band) {
      const int lo = band == 0 ? 0 : p.edges[band - 1];
      const int hi = band < p.num_edges ? p.edges[band] : kFullWindow;
      if (band == p.num_edges && !p.has_full) break;
      if (d_max >= lo && d_min < hi) {
        ++bands;
        lo1 = lo;
        hi1 = hi;
      }
      if (band < p.num_edges) snaps |= wr0 <= j0 + BN + hi - 2 && w_last >= j0 + hi - 1;
    }
    return bands == 1 && !snaps;
  };

  // The walk: from the tile holding the last query's diagonal down to the lowest key any window needs.
  for (int kb = tiles.top; kb >= tiles.bottom; --kb) {
    int j0 = kb * BN;
    const int stage = begin_tile();
    const int d_min = dist_min(kb), d_max = dist_max(kb);
    const bool active = is_active(kb);
    if constexpr (kOverlap) {
      int lo = 0, hi = 0;
      if (plain_band(kb, lo, hi)) {
        // the run's first tile: its softmax, with nothing to overlap yet
        sched_sync();
        sm90::wg_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
        sched_arrive();
        float alpha[2];
        band_softmax(std::true_type{}, j0, lo, hi, d_min, d_max, alpha);  // no P V pending: straight to P
        int held = stage;  // the stage of the tile whose P V is pending
        // kLean: the run's lowest tile computed once. Every tile below a plain one meets its band, and stays plain
        // in it down to tile 1 (tile 0 holds the full window's snapshot) while its distances stay below hi - 1
        // (window hi's snapshot): d_max(kb) <= hi - 2 <=> kb >= ceil((w_last - hi + 2) / BN). Checked against
        // plain_band at every tile by csrc/tools/sim_fwd_sm90_walk.py.
        const int past_hi = w_last - hi + 2;
        const int run_low = max(max(tiles.bottom, 1), past_hi > 0 ? (past_hi + BN - 1) / BN : 0);
        while (kLean ? kb > run_low : kb > tiles.bottom && plain_band(kb - 1, lo, hi)) {
          --kb;
          j0 = kb * BN;
          const int next = begin_tile();
          sched_sync();
          sm90::wg_gemm_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, next), tSrS);
          rescale_o(alpha);  // O is not an operand of the Q K^T in flight
          sm90::wg_gemm_issue<false>(mma_pv, tOrP, tOrV(_, _, _, held), tOrO);
          sched_arrive();
          sm90::wg_wait<1>(tSrS);  // this tile's S (issued first: groups complete in order)
          band_softmax(std::false_type{}, j0, lo, hi, dist_min(kb), dist_max(kb), alpha);  // while the P V runs
          sm90::wg_wait<0>(tOrO, tSrP);  // the P V has read P and V: P may be overwritten, the stage released
          end_tile();
          convert_p();
          held = next;
        }
        rescale_o(alpha);
        sm90::wg_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, held), tOrO);
        end_tile();
        continue;
      }
    }
    sched_sync();  // a serial tile's Q K^T is waited for within its turn (a wait outside it, under the branch,
    if (active) sm90::wg_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);  // made ptxas serialise wgmma)
    sched_arrive();
    for (int band = 0; band <= p.num_edges; ++band) {
      const int lo = band == 0 ? 0 : p.edges[band - 1];
      const int hi = band < p.num_edges ? p.edges[band] : kFullWindow;
      if (band == p.num_edges && !p.has_full) break;
      if (active && d_max >= lo && d_min < hi) {
        float alpha[2];
        band_softmax(std::true_type{}, j0, lo, hi, d_min, d_max, alpha);  // S stays: the next band reads it
        rescale_o(alpha);
        sm90::wg_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
      }
      snapshot(hi, j0);
    }
    end_tile();
  }

  // Sink candidates: their sink keys outside the window, then the merge with the window snapshot.
  for (int c = 0; c < C; ++c) {
    const int sink = p.sinks[c];
    if (sink == 0) continue;
    const int window = p.windows[c];
    int limit[2];  // sink keys j < limit lie outside the window
#pragma unroll
    for (int i = 0; i < 2; ++i) limit[i] = row_ok[i] ? min(sink, max(0, t[i] - window + 1)) : 0;
    // the warpgroup's largest limit: that of its last live row (limit grows with t)
    const int wg_limit = wg_live ? min(sink, max(0, w_last - window + 1)) : 0;
    reset_state();
    const int n = tiles.sink_tiles(c);
    for (int kb = 0; kb < n; ++kb) {
      const int j0 = kb * BN;
      const int stage = begin_tile();
      const bool takes = wg_limit > j0;  // warpgroup-uniform: does any row of the warpgroup take a key of this tile?
      sched_sync();
      if (takes) sm90::wg_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      sched_arrive();
      if (takes) {
        softmax_step(std::true_type{}, j0, stage, [&](int i, int j) { return j < limit[i]; });
      }
      end_tile();
    }
    __syncwarp();  // the sink LSE below was written by another lane of this thread's quad
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!row_ok[i]) continue;
      // written by this thread (O) and by the LSE writer of its row, before the barriers of the sink tiles
      const float* window_out = p.sink_o + c * o_plane + out_row(i);
      float value[ND][2];
      const float lse = frag_rows::merge_sink(
          value, [&](int d) { return *reinterpret_cast<const float2*>(window_out + o_col(d)); },
          p.sink_lse[lse_row(i) + int64_t(c) * p.seq], [&](int d, int k) { return O(i, 2 * d + k); }, m[i], l[i]);
      emit(c, i, value, lse);
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    T* dst = y + out_row(i);
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      float2 yv;
      if constexpr (kYShared) yv = reinterpret_cast<const float2*>(sY + d * NT)[i];
      else yv = make_float2(y_acc[d][2 * i], y_acc[d][2 * i + 1]);
      *reinterpret_cast<uint32_t*>(dst + o_col(d)) = mma16::pack2<T>(yv.x, yv.y);
    }
  }
  };  // consumer_body

  if constexpr (kTma) {
    typename Pipeline::Params pipe_params;
    pipe_params.transaction_bytes = Tr::kTmaBytes;
    pipe_params.role = wg == 2 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pipe_params.is_leader = tid == NT;  // the producer's first thread: the one that issues the loads
    pipe_params.num_consumers = NT;
    Pipeline pipeline(*pipeline_storage, pipe_params, Shape<_1, _1, _1>{});
    __syncthreads();  // the barriers initialised (fence_barrier_init in the constructor) before anyone uses them
    if (wg == 2) {  // producer
      cutlass::arch::warpgroup_reg_dealloc<24>();
      if (tid == NT) {
        const int hk = h / p.group;
        Tensor mK = tma_k.get_tma_tensor(make_shape(p.seq, Int<D>{}, p.heads_q / p.group, p.batch));
        Tensor mVt = tma_v.get_tma_tensor(make_shape(Int<D>{}, p.seq, p.heads_q / p.group, p.batch));
        Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<BN>, Int<D>>{}, make_coord(_, _0{}));     // (BN, D, n)
        Tensor gVt = local_tile(mVt(_, _, hk, b), Shape<Int<D>, Int<BN>>{}, make_coord(_0{}, _));  // (D, BN, n)
        auto tma_k_blk = tma_k.get_slice(_0{});
        auto tma_v_blk = tma_v.get_slice(_0{});
        Tensor tKgK = group_modes<0, 3>(tma_k_blk.partition_S(gK));   // (TMA, n)
        Tensor tKsK = group_modes<0, 3>(tma_k_blk.partition_D(sK));   // (TMA, stage)
        Tensor tVgV = group_modes<0, 3>(tma_v_blk.partition_S(gVt));  // (TMA, n)
        Tensor tVsV = group_modes<0, 3>(tma_v_blk.partition_D(sVt));  // (TMA, stage)
        PipelineState state = cutlass::make_producer_start_state<Pipeline>();
        for (int s = 0; s < tiles.total; ++s) {
          const int tile = tiles.at(s);
          pipeline.producer_acquire(state);
          auto* bar = pipeline.producer_get_barrier(state);
          copy(tma_k.with(*bar), tKgK(_, tile), tKsK(_, state.index()));
          copy(tma_v.with(*bar), tVgV(_, tile), tVsV(_, state.index()));
          ++state;
        }
        pipeline.producer_tail(state);  // no exit while loads are in flight
      }
      return;
    }
    cutlass::arch::warpgroup_reg_alloc<240>();
    consumer_body(pipeline);
  } else {
    sm90::NoTma none;
    consumer_body(none);
  }
#endif
}

}  // namespace dash
