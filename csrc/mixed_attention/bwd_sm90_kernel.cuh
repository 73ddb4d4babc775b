// Backward of dash_kernels.mixed_attention, Hopper (sm_90a) mainloop with CuTe wgmma, FlashAttention-3 structured
// (DASH_CUDA_BWD=sm90; see bwd.cu and bwd_sm90.cu). Only compiled where the CUTLASS/CuTe headers were found
// (DASH_WITH_SM90_CUTE, setup.py). Not yet run on a GPU at the time of writing: read "v1" below before trusting it.
//
// The math and the region logic are those of bwd_mma_kernel.cuh (its semantic reference): the prep kernel
// (bwd_kernel.cuh) gives per (row t, region r) the coefficients ref_r, A_r, B_r, and per (query t, key j) of region r
//   p = 2^(s scale_log2 - ref_r),  pa = p A_r,  dS = p (A_r dP - B_r),
//   dV_j += sum_t pa dY_t,  dK_j += scale sum_t dS q_t,  dQ_t += scale sum_j dS k_j.
// One block per 128-key tile (blockIdx.x ascending: the lowest keys, the longest walks, first) walking the 64-row
// query tiles that see it (the same m range as the mma backward). 384 threads: warpgroup 0 the producer
// (setmaxnreg 24), warpgroups 1 and 2 the consumers (setmaxnreg 240), each owning 64 of the tile's keys.
// The five products per query tile (benchmarks/NOTES.md, Issue 6, section 2; FA3's D 128 causal flags: SdP_swapAB,
// RS dK/dV, SS dQ), per consumer warpgroup:
//   S^T  = K Q^T      SS wgmma, 64 keys x 64 queries x D     (A sK, B sQ[stage], both K-major)
//   dP^T = V dY^T     SS wgmma, 64 keys x 64 queries x D     (A sV, B sdY[stage])
//   dV  += pa^T dY    RS wgmma, 64 keys x D x 64 queries     (A: pa rounded to 16 bits in S^T's accumulator
//                                                             registers, viewed as the A operand; B: sdY^T, an
//                                                             MN-major view of the same bytes)
//   dK  += dS^T Q     RS wgmma, likewise (A: dS in registers, B: sQ^T)
//   dQ   = dS K       SS wgmma (A: sdS, MN-major = queries contiguous, written from the registers as 32-bit pairs;
//                     B: sK^T, an MN-major view of sK), zero-initialised every step and added (pre-scaled) into the
//                     zeroed fp32 dq_accum by atomics, as the mma backward does.
//     D 128: the two warpgroups split D (atom layout 1 x 2 x 1: 64 queries x 64 d x 128 keys each; both read all of
//            sdS, hence a 256-thread barrier after dS is written).
//     D 64:  a half-D split would need a 32-wide MN-major B operand (half a 128B swizzle atom), so the warpgroups
//            split the keys instead: each computes dQ[64 queries, 64 d] over its own 64 keys from its own half of
//            sdS (a 128-thread barrier per warpgroup) and adds its partial by atomics (twice the dQ atomics).
// Loads: the producer's one thread issues TMA: K and V once (one mbarrier with their transaction bytes), Q and dY
// of each query tile into a 2-stage cutlass::PipelineTmaAsync (both on one stage's barrier); the consumers release
// a stage once the four products that read it have completed. The query tile's region coefficients (3 R 64
// floats) are double-buffered in shared memory by cp.async from the 256 consumer threads, with one 256-thread
// named barrier at the top of each step (which also orders the single dS buffer: every warpgroup has finished the
// previous step's dQ product, and its reads of sdS, before anyone writes dS again).
//
// v1 simplifications (csrc/README.md): kBlockM 64, kBlockN 128, D 64 and 128, bf16 / fp16; one pipeline for Q and
// dY (FA3: two, so that S^T can start before dY lands); dS products waited for within the step (no overlap of one
// step's dQ with the next step's S^T); dQ by float2 atomics from registers (no smem + bulk reduce-add +
// postprocess); dK / dV written from registers in fp32 per query head into the mma backward's buffers (the
// launcher sums GQA groups); coefficients loaded by the consumers (no bulk copy on the Q barrier); the region of
// each element computed per element (bwd_mma_kernel.cuh's generic path) except where a warp's 16 keys x 64
// queries all lie in one region (then one float2 per coefficient per column pair); no interior fast path beyond
// that, no masking-free loop split.
// Hang guard: every mbarrier wait (K / V, the Q / dY stages, the producer's acquires and tail) traps after 30 s
// (sm90::wait_or_trap), so that a protocol bug fails the launch instead of hanging the GPU.
// Warpgroup-collective: a wgmma is issued by all 128 threads of a warpgroup, and every step runs all five
// products in both warpgroups (no step is skipped: the barriers and the D 128 dQ product need both); inactive
// warps just write zeros for pa / dS.
#pragma once

#include "bwd_mma_kernel.cuh"  // BwdMmaParams, cp_async_4, atomic_add2, band_of, level_of
#include "bwd_sm90_tile.h"
#include "fwd_sm90_kernel.cuh"  // sm90::CuteType, acc_rowcol, acc_as_a, the CuTe / CUTLASS includes

namespace dash {
namespace sm90 {

template <typename T, int D>
struct BwdTraits {
  using Tile = BwdSm90Tile<D>;
  using Element = typename CuteType<T>::type;
  static constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, kStages = Tile::kStages;
  static constexpr bool kDqSplitK = D == 64;  // see the header: dQ split over keys (D 64) or over D (D 128)
  // S^T, dP^T: (keys, queries, D), one 64-key atom per warpgroup
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<BN>, Int<BM>, Int<D>>>(), Layout<Shape<_2, _1, _1>>{}));
  // dV, dK: (keys, D, queries), A from registers, B MN-major (d contiguous)
  using TiledMmadKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<BN>, Int<D>, Int<BM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  // dQ: (queries, D, keys), A = dS MN-major (queries contiguous), B = K^T MN-major (d contiguous)
  using TileDq = std::conditional_t<kDqSplitK, Shape<Int<BM>, Int<D>, Int<BN / 2>>, Shape<Int<BM>, Int<D / 2>, Int<BN>>>;
  using AtomDq = std::conditional_t<kDqSplitK, Layout<Shape<_1, _1, _1>>, Layout<Shape<_1, _2, _1>>>;
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileDq, GMMA::Major::MN, GMMA::Major::MN>(), AtomDq{}));
  static constexpr int kDqThreads = kDqSplitK ? 128 : 256;
  static_assert(size(TiledMmaSdP{}) == 256 && size(TiledMmadKV{}) == 256 && size(TiledMmadQ{}) == kDqThreads,
                "2 consumer warpgroups");

  // K, V: (keys, D) K-major; Q, dY: (queries, D, stage) K-major; the transposed (MN-major) views of the same
  // bytes for the B operands of dV / dK (Q^T, dY^T: (D, queries, stage)) and dQ (K^T: (D, keys)); dS (queries,
  // keys) MN-major (queries contiguous: the direction the S^T accumulator holds its pairs in)
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<BN>, Int<D>>{}));
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<BM>, Int<D>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<D>, Int<BM>, Int<kStages>>{}, make_stride(Int<BM>{}, _1{}, Int<BM * D>{}))));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<D>, Int<BN>>{}, make_stride(Int<BN>{}, _1{}))));
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<BM>, Int<BN>>{}));
  static constexpr size_t kKElems = cosize_v<SmemLayoutK>;
  static constexpr size_t kQElems = cosize_v<SmemLayoutQ>;
  static constexpr size_t kDsElems = cosize_v<SmemLayoutdS>;
  static_assert(kKElems * 2 == Tile::kKBytes && kQElems * 2 == kStages * Tile::kQBytes &&
                    kDsElems * 2 == Tile::kDsBytes,
                "tile sizes (bwd_sm90_tile.h)");

  // TMA: Q, dY as (T, D, Hq, B) into one stage of SmemLayoutQ; K, V as (T, D, Hkv, B) into SmemLayoutK. Built on
  // the host (bwd_sm90.cu); rows t >= T read as zeros.
  static auto make_tma_q(const Element* ptr, int seq, int heads, int batch, int64_t st, int64_t sh, int64_t sb) {
    Tensor m = make_tensor(make_gmem_ptr(ptr), make_shape(seq, Int<D>{}, heads, batch), make_stride(st, _1{}, sh, sb));
    return make_tma_copy(SM90_TMA_LOAD{}, m, take<0, 2>(SmemLayoutQ{}));
  }
  static auto make_tma_k(const Element* ptr, int seq, int heads, int batch, int64_t st, int64_t sh, int64_t sb) {
    Tensor m = make_tensor(make_gmem_ptr(ptr), make_shape(seq, Int<D>{}, heads, batch), make_stride(st, _1{}, sh, sb));
    return make_tma_copy(SM90_TMA_LOAD{}, m, SmemLayoutK{});
  }
  using TmaQ = decltype(make_tma_q(nullptr, 1, 1, 1, 1, 1, 1));
  using TmaK = decltype(make_tma_k(nullptr, 1, 1, 1, 1, 1, 1));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static_assert(sizeof(typename Pipeline::SharedStorage) <= 64, "pipeline barriers (bwd_sm90_tile.h)");
  static constexpr uint32_t kQTmaBytes = 2 * uint32_t(Tile::kQBytes);  // Q and dY of one query tile
  static constexpr uint32_t kKVTmaBytes = 2 * uint32_t(Tile::kKBytes);

  // named barrier ids (cutlass::arch::NamedBarrier adds its 8 reserved ones): the consumers' step barrier, the dS
  // barrier (D 128: 256 threads; D 64: one per warpgroup, ids kBarDs + warpgroup)
  static constexpr uint32_t kBarStep = 1, kBarDs = 2;
  // kDqBulk: the dQ buffer's hand-over between the consumers (256) and the producer warpgroup's writer warp (32)
  static constexpr uint32_t kBarDqFull = 4, kBarDqEmpty = 5;
};

// sm90::wg_gemm_issue (fwd_sm90_kernel.cuh) issues each product without waiting; the caller waits with
// warpgroup_wait<n> and then fences the operands.

// Hang guard of the mbarrier waits (the one failure mode a GPU test cannot time out of cheaply): a wait not complete
// after kWatchdogNs traps (and, built with DASH_SM90_WATCHDOG_PRINT, prints which wait, block and thread first) (the launch then fails with an error instead of
// hanging). A named-barrier deadlock among the consumers also ends here: the producer then waits forever for a stage
// release. 30 s is far beyond any healthy wait (a TMA load: microseconds), also under compute-sanitizer.
constexpr uint64_t kWatchdogNs = 30ull * 1000 * 1000 * 1000;

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The message is a printf, i.e. a function call, and ptxas serialises every wgmma of a kernel that contains a
// call (C7510): so it is compiled in only with -DDASH_SM90_WATCHDOG_PRINT (debug builds); by default every
// watchdog traps silently (the launch fails with an illegal-instruction error instead of hanging).
#ifdef DASH_SM90_WATCHDOG_PRINT
__device__ __noinline__ void watchdog_fire(const char* what, int step) {
  printf("bwd_sm90 watchdog: block (%d, %d) thread %d waited %d s in %s (step %d): trap\n", int(blockIdx.x),
         int(blockIdx.y), int(threadIdx.x), int(kWatchdogNs / 1000000000ull), what, step);
  __trap();
}
#endif

// Spins on try_wait() (true once the awaited phase completed) with the watchdog above. kPrint: say which wait,
// with DASH_SM90_WATCHDOG_PRINT (a call: only where few registers are live, i.e. the producer; in the consumers
// a call spilled 1 KB at D 128, so they trap silently: the producer's message names the stuck block).
template <bool kPrint, typename TryWait>
__device__ __forceinline__ void wait_or_trap(TryWait&& try_wait, const char* what, int step) {
  if (try_wait()) return;
  const uint64_t t0 = global_ns();
  while (!try_wait()) {
    if (global_ns() - t0 > kWatchdogNs) {
#ifdef DASH_SM90_WATCHDOG_PRINT
      if constexpr (kPrint) watchdog_fire(what, step);
#endif
      (void)what; (void)step;
      __trap();
    }
  }
}

}  // namespace sm90

// kLean (DASH_CUDA_BWD=sm90lean): the coefficient copies count their row blocks instead of dividing by the region
// count (issue_coef below); otherwise the same kernel.
// kDqBulk (DASH_CUDA_BWD=sm90dq, with kLean): dQ leaves by bulk reduce-add instead of per-element atomics, as
// FA3's backward does: the consumers write the step's dQ (times scale) into a padded fp32 buffer in shared memory
// and hand it over (named barrier DqFull) to warp 1 of the producer warpgroup, which adds each valid row into
// dq_accum with one cp.reduce.async.bulk (512 B at D 128) and hands the buffer back (DqEmpty) once the copies have
// read it.
template <typename T, int D, bool kLean, bool kDqBulk, typename TmaQ, typename TmaK>
__global__ void __launch_bounds__(BwdSm90Tile<D>::kThreads, 1) mixed_attention_bwd_sm90_kernel(
    const __grid_constant__ BwdMmaParams p, const __grid_constant__ TmaQ tma_q, const __grid_constant__ TmaQ tma_dy,
    const __grid_constant__ TmaK tma_k, const __grid_constant__ TmaK tma_v) {
#if defined(__CUDA_ARCH__) && !defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  __trap();  // built for another architecture: the launcher refuses before this (bwd.cu)
#else
  using namespace cute;
  using Tr = sm90::BwdTraits<T, D>;
  using Tile = BwdSm90Tile<D>;
  using Element = typename Tr::Element;
  using Pipeline = typename Tr::Pipeline;
  using PipelineState = cutlass::PipelineState<Tile::kStages>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, NC = Tile::kConsumers;
  constexpr bool kDqSplitK = Tr::kDqSplitK;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // the 128B swizzle is a function of the address bits: every tile starts 1024-byte aligned (all sizes are
  // multiples of 1024 B)
  const uint32_t pad = (1024u - (mma16::smem_u32(smem_raw) & 1023u)) & 1023u;
  Element* k_ptr = reinterpret_cast<Element*>(smem_raw + pad);
  Element* v_ptr = k_ptr + Tr::kKElems;
  Element* q_ptr = v_ptr + Tr::kKElems;
  Element* dy_ptr = q_ptr + Tr::kQElems;
  Element* ds_ptr = dy_ptr + Tr::kQElems;
  unsigned char* bar_base = reinterpret_cast<unsigned char*>(ds_ptr + Tr::kDsElems);
  auto* pipeline_storage = reinterpret_cast<typename Pipeline::SharedStorage*>(bar_base);
  uint64_t* barrier_kv = reinterpret_cast<uint64_t*>(bar_base + 64);
  // kDqBulk: the dQ buffer [kDqBuffers][BM][kDqLd] fp32 first, then the coefficients (stage s: + s 3 R BM floats)
  [[maybe_unused]] float* sdq = reinterpret_cast<float*>(bar_base + Tile::kBarrierBytes);
  float* coef0 = reinterpret_cast<float*>(bar_base + Tile::kBarrierBytes + (kDqBulk ? Tile::kDqBytes : 0));

  Tensor sK = make_tensor(make_smem_ptr(k_ptr), typename Tr::SmemLayoutK{});     // (BN, D)
  Tensor sV = make_tensor(make_smem_ptr(v_ptr), typename Tr::SmemLayoutK{});     // (BN, D)
  Tensor sKt = make_tensor(make_smem_ptr(k_ptr), typename Tr::SmemLayoutKt{});   // (D, BN)
  Tensor sQ = make_tensor(make_smem_ptr(q_ptr), typename Tr::SmemLayoutQ{});     // (BM, D, stage)
  Tensor sdY = make_tensor(make_smem_ptr(dy_ptr), typename Tr::SmemLayoutQ{});   // (BM, D, stage)
  Tensor sQt = make_tensor(make_smem_ptr(q_ptr), typename Tr::SmemLayoutQt{});   // (D, BM, stage)
  Tensor sdYt = make_tensor(make_smem_ptr(dy_ptr), typename Tr::SmemLayoutQt{}); // (D, BM, stage)
  Tensor sdS = make_tensor(make_smem_ptr(ds_ptr), typename Tr::SmemLayoutdS{});  // (BM, BN)

  const int n_block = blockIdx.x;
  const int j0 = n_block * BN;
  const int bh = blockIdx.y;
  const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.group;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  // The query tiles that see this key tile (bwd_mma_kernel.cuh): from the one holding j0 up to the farthest any
  // candidate reaches. Producer and consumers walk the same `steps` tiles: the pipeline stays balanced.
  const int j1 = min(j0 + BN, p.seq) - 1;
  const int m_begin = (j0 / BM) * BM;
  const int m_end = (p.has_full || j0 < p.max_sink) ? p.seq : min(p.seq, j1 + p.widest);
  const int steps = (m_end - m_begin + BM - 1) / BM;  // >= 1: the tile at j0 sees its own diagonal

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Tr::kQTmaBytes;
  pipe_params.role = wg == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = tid == 0;  // the producer thread that issues the loads
  pipe_params.num_consumers = NC;
  Pipeline pipeline(*pipeline_storage, pipe_params, Shape<_1, _1, _1>{});
  if (tid == 0) cutlass::arch::ClusterTransactionBarrier::init(barrier_kv, 1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();  // the barriers initialised before anyone uses them (the last block-wide barrier: the
                    // producer warpgroup's idle threads leave below)

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (tid == 0) {
      const int heads_kv = p.heads_q / p.group;
      Tensor mQ = tma_q.get_tma_tensor(make_shape(p.seq, Int<D>{}, p.heads_q, p.batch));
      Tensor mdY = tma_dy.get_tma_tensor(make_shape(p.seq, Int<D>{}, p.heads_q, p.batch));
      Tensor mK = tma_k.get_tma_tensor(make_shape(p.seq, Int<D>{}, heads_kv, p.batch));
      Tensor mV = tma_v.get_tma_tensor(make_shape(p.seq, Int<D>{}, heads_kv, p.batch));
      Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<BM>, Int<D>>{}, make_coord(_, _0{}));    // (BM, D, m)
      Tensor gdY = local_tile(mdY(_, _, h, b), Shape<Int<BM>, Int<D>>{}, make_coord(_, _0{}));  // (BM, D, m)
      Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<BN>, Int<D>>{}, make_coord(n_block, _0{}));  // (BN, D)
      Tensor gV = local_tile(mV(_, _, hk, b), Shape<Int<BN>, Int<D>>{}, make_coord(n_block, _0{}));  // (BN, D)
      auto tma_q_blk = tma_q.get_slice(_0{});
      auto tma_dy_blk = tma_dy.get_slice(_0{});
      auto tma_k_blk = tma_k.get_slice(_0{});
      auto tma_v_blk = tma_v.get_slice(_0{});
      Tensor tQgQ = group_modes<0, 3>(tma_q_blk.partition_S(gQ));     // (TMA, m)
      Tensor tQsQ = group_modes<0, 3>(tma_q_blk.partition_D(sQ));     // (TMA, stage)
      Tensor tdYgdY = group_modes<0, 3>(tma_dy_blk.partition_S(gdY));  // (TMA, m)
      Tensor tdYsdY = group_modes<0, 3>(tma_dy_blk.partition_D(sdY));  // (TMA, stage)
      Tensor tKgK = tma_k_blk.partition_S(gK);
      Tensor tKsK = tma_k_blk.partition_D(sK);
      Tensor tVgV = tma_v_blk.partition_S(gV);
      Tensor tVsV = tma_v_blk.partition_D(sV);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(barrier_kv, Tr::kKVTmaBytes);
      copy(tma_k.with(*barrier_kv), tKgK, tKsK);
      copy(tma_v.with(*barrier_kv), tVgV, tVsV);
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      for (int s = 0; s < steps; ++s) {
        const int m_blk = m_begin / BM + s;
        // wait until the stage is free (watchdog), then arm its barrier with kQTmaBytes
        sm90::wait_or_trap<true>([&] { return pipeline.producer_try_acquire(state) == cutlass::BarrierStatus::WaitDone; },
                           "producer_acquire (a Q / dY stage released)", s);
        pipeline.producer_acquire(state, {cutlass::BarrierStatus::WaitDone});
        auto* bar = pipeline.producer_get_barrier(state);
        copy(tma_q.with(*bar), tQgQ(_, m_blk), tQsQ(_, state.index()));
        copy(tma_dy.with(*bar), tdYgdY(_, m_blk), tdYsdY(_, state.index()));
        ++state;
      }
      // producer_tail with the watchdog: no exit while loads are in flight (wait for the consumers' last releases)
      for (int s = 0; s < Tile::kStages; ++s) {
        sm90::wait_or_trap<true>([&] { return pipeline.producer_try_acquire(state) == cutlass::BarrierStatus::WaitDone; },
                           "producer_tail", steps + s);
        ++state;
      }
    }
    if constexpr (kDqBulk) {
      if (tid / 32 == 1) {  // the dQ writer warp: each lane adds rows lane, lane + 32, ... of every buffer
        const int lane = tid % 32;
        cutlass::arch::NamedBarrier::arrive(NC + 32, Tr::kBarDqEmpty);  // the buffer starts free
        for (int s = 0; s < steps; ++s) {
          const int m0 = m_begin + s * BM;
          const int rows = min(BM, p.seq - m0);
          cutlass::arch::NamedBarrier::sync(NC + 32, Tr::kBarDqFull);  // the consumers wrote it (and fenced)
          for (int k = 0; k < Tile::kDqBuffers; ++k)
            for (int r = lane; r < rows; r += 32) {
              float* dst = p.dq_accum + ((int64_t(b) * p.seq + m0 + r) * p.heads_q + h) * D;
              const uint32_t src = mma16::smem_u32(sdq + (k * BM + r) * Tile::kDqLd);
              asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                           :: "l"(dst), "r"(src), "n"(D * 4) : "memory");
            }
          asm volatile("cp.async.bulk.commit_group;");
          asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // this lane's copies have read the buffer
          __syncwarp();
          if (s + 1 < steps) cutlass::arch::NamedBarrier::arrive(NC + 32, Tr::kBarDqEmpty);
        }
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // and written dq_accum, before the block ends
      }
    }
    return;
  }

  // ---- consumers: warpgroups 1 and 2 ----
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int ctid = tid - 128;      // 0 .. 255
  const int cwg = ctid / 128;      // which 64 keys of the tile
  const int wwarp = (ctid % 128) / 32;  // warp within the warpgroup: its 16 keys
  const int R = p.num_regions;

  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(ctid);
  auto thr_dkv = mma_dkv.get_thread_slice(ctid);
  auto thr_dq = mma_dq.get_thread_slice(kDqSplitK ? ctid % 128 : ctid);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);    // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
  Tensor tdPrdY = thr_sdp.partition_fragment_B(sdY);
  Tensor tdVrdY = thr_dkv.partition_fragment_B(sdYt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);
  // dQ's operands: all of sdS and sK^T (D 128), or this warpgroup's 64 keys of them (D 64)
  auto dq_operands = [&]() {
    if constexpr (kDqSplitK)
      return cute::make_tuple(local_tile(sdS, Shape<Int<BM>, Int<BN / 2>>{}, make_coord(_0{}, cwg)),
                              local_tile(sKt, Shape<Int<D>, Int<BN / 2>>{}, make_coord(_0{}, cwg)));
    else
      return cute::make_tuple(sdS, sKt);
  }();
  Tensor tdQrdS = thr_dq.partition_fragment_A(get<0>(dq_operands));  // (MMA, MMA_M, MMA_K)
  Tensor tdQrK = thr_dq.partition_fragment_B(get<1>(dq_operands));   // (MMA, MMA_N, MMA_K)

  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<Int<BN>, Int<D>>{});
  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<Int<BN>, Int<D>>{});
  clear(tdVrdV);
  clear(tdKrdK);
  // (row, col) of each accumulator element, from CuTe (identity tensors partitioned as the accumulators)
  Tensor cS_part = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor cS = make_tensor(cS_part.data(), sm90::acc_rowcol(cS_part.layout()));  // (2 keys, BM / 4 queries)
  constexpr int NQC = decltype(size<1>(cS))::value;                             // query columns a thread holds
  static_assert(decltype(size<0>(cS))::value == 2 && NQC == BM / 4, "S^T: 2 keys x 16 queries a thread");

  // this thread's keys and their sink levels (constant for the whole walk)
  int key[2], level[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    key[i] = j0 + int(get<0>(cS(i, 0)));
    level[i] = level_of(p, key[i]);
  }
  // byte offsets in sdS of this thread's first dS pair of each key; the others are these XOR 2 x their column
  // distance (the 128B swizzle is an XOR of address bits, and the column steps touch no bit it reads:
  // check_sm90_layouts.cc verifies the identity for every element); saves 32 live addresses
  uint32_t ds_off[2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
    ds_off[i] = uint32_t(reinterpret_cast<const unsigned char*>(&sdS(int(get<1>(cS(i, 0))), int(get<0>(cS(i, 0))))) -
                         reinterpret_cast<const unsigned char*>(ds_ptr));
  // the warp's 16 keys (check_sm90_layouts.cc: every thread's keys lie in [16 warp, 16 warp + 16) of its
  // warpgroup's 64), warp-uniform facts about them
  const int jw0 = j0 + 64 * cwg + 16 * wwarp;
  const bool keys_full = jw0 + 15 < p.seq;
  const int level_lo = level_of(p, jw0), level_hi = level_of(p, jw0 + 15);

  // the query tile's coefficients [ref | A | B][region][query] of step `step` into stage step & 1, by cp.async
  // from the 256 consumer threads (rows t >= T zero-filled)
  // kLean: each thread copies its query column tl = ctid % BM (NC is a multiple of BM) of every (NC / BM)-th row
  // block rb = (which, r) of the 3 R rows, rb / R and rb % R kept by counting: a division by the runtime R cost ~80
  // instructions a copy, about a quarter of a step's at 6 regions (csrc/tools/sim_bwd_sm90_lean.py checks that both
  // copy the same elements)
  static_assert(NC % BM == 0, "a thread's query column is the same in every row block");
  auto issue_coef = [&](int step) {
    const int m0 = m_begin + step * BM;
    float* dst = coef0 + (step & 1) * 3 * R * BM;
    if constexpr (kLean) {
      constexpr int kRowsPerPass = NC / BM;
      const int tl = ctid % BM;
      const bool valid = m0 + tl < p.seq;
      int which = 0, r = ctid / BM;
      while (r >= R && which < 3) {
        r -= R;
        ++which;
      }
      for (int rb = ctid / BM; rb < 3 * R; rb += kRowsPerPass) {
        const float* src = which == 0 ? p.ref : which == 1 ? p.coef_a : p.coef_b;
        const float* base = src + (int64_t(bh) * R + r) * p.seq;
        cp_async_4(dst + rb * BM + tl, valid ? base + m0 + tl : base, valid);
        r += kRowsPerPass;
        while (r >= R) {  // at most kRowsPerPass / R + 1 times
          r -= R;
          ++which;
        }
      }
      return;
    }
    const int n = 3 * R * BM;
    for (int idx = ctid; idx < n; idx += NC) {
      const int which = idx / (R * BM), r = (idx / BM) % R, tl = idx % BM;
      const float* src = which == 0 ? p.ref : which == 1 ? p.coef_a : p.coef_b;
      const float* base = src + (int64_t(bh) * R + r) * p.seq;
      const bool valid = m0 + tl < p.seq;
      cp_async_4(dst + idx, valid ? base + m0 + tl : base, valid);
    }
  };
  issue_coef(0);

  sm90::wait_or_trap<false>([&] { return cutlass::arch::ClusterBarrier::try_wait(barrier_kv, 0); }, "K / V barrier", -1);
  PipelineState state;  // the consumers' start state: stage 0, phase 0
  // kLean: the bands of the warp's smallest and largest distance this step, counted up as the walk goes (both
  // distances grow by BM a step) instead of band_of's loop over every edge twice a step
  [[maybe_unused]] int band_at_min = 0, band_at_max = 0;

  for (int step = 0; step < steps; ++step) {
    const int m0 = m_begin + step * BM;
    // this step's coefficients: own copies landed, then everyone's (the barrier); every consumer is also past the
    // previous step (its coefficient reads, its dQ product on sdS), so the other stage and sdS are free
    cp_async_wait_all();
    cutlass::arch::NamedBarrier::sync(NC, Tr::kBarStep);
    if (step + 1 < steps) issue_coef(step + 1);
    const float* sRef = coef0 + (step & 1) * 3 * R * BM;
    const float* sA = sRef + R * BM;
    const float* sB = sA + R * BM;

    // Q and dY of this step have landed (watchdog)
    sm90::wait_or_trap<false>([&] { return pipeline.consumer_try_wait(state) == cutlass::BarrierStatus::WaitDone; },
                       "consumer_wait (Q, dY)", step);
    pipeline.consumer_wait(state, {cutlass::BarrierStatus::WaitDone});
    const int stage = state.index();

    // S^T = K Q^T and dP^T = V dY^T, both in flight, then waited for
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{});
    Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{});
    sm90::wg_gemm_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
    sm90::wg_gemm_issue<true>(mma_sdp, tdPrV, tdPrdY(_, _, _, stage), tdPrdP);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tdPrdP);
    Tensor S = make_tensor(tSrS.data(), sm90::acc_rowcol(tSrS.layout()));
    Tensor dP = make_tensor(tdPrdP.data(), sm90::acc_rowcol(tdPrdP.layout()));

    // pa and dS per element, rounded to 16 bits in S^T's register layout (the RS A operands of dV / dK), and dS
    // to sdS as 32-bit pairs (columns 2c, 2c + 1 of a row are adjacent queries: check_sm90_layouts.cc)
    Tensor tPa = make_tensor_like<Element>(tSrS);
    Tensor tDs = make_tensor_like<Element>(tSrS);
    Tensor Pa = make_tensor(tPa.data(), sm90::acc_rowcol(tPa.layout()));
    Tensor Ds = make_tensor(tDs.data(), sm90::acc_rowcol(tDs.layout()));

    // which (t, j) of the warp's 16 keys x BM queries any candidate sees (warp-uniform, bwd_mma_kernel.cuh)
    const int t_last = min(m0 + BM - 1, p.seq - 1);
    const int d_min = m0 - (jw0 + 15), d_max = t_last - jw0;
    bool active = jw0 < p.seq && d_max >= 0 && (p.has_full || jw0 < p.max_sink || d_min < p.widest);
    int uniform_r = -1;  // one region for every pair: no tail, no diagonal, one band and one sink level
    if constexpr (kLean) {
      while (band_at_min < p.num_bands && d_min >= p.band_edges[band_at_min]) ++band_at_min;
      while (band_at_max < p.num_bands && d_max >= p.band_edges[band_at_max]) ++band_at_max;
      if (active && keys_full && m0 + BM <= p.seq && d_min >= 0 && level_lo == level_hi && band_at_min == band_at_max)
        uniform_r = band_at_min * (p.num_sinks + 1) + level_lo;
    } else if (active && keys_full && m0 + BM <= p.seq && d_min >= 0 && level_lo == level_hi) {
      const int band = band_of(p, d_min);
      if (band == band_of(p, d_max)) uniform_r = band * (p.num_sinks + 1) + level_lo;
    }
    if (uniform_r >= 0 && p.membership[uniform_r] == 0) active = false;

    // element pair (i, c), (i, c + 1) of this thread: the registers and the 32-bit store to sdS
    auto put = [&](int i, int c, float pa0, float pa1, float ds0, float ds1) {
      Pa(i, c) = static_cast<Element>(pa0);
      Pa(i, c + 1) = static_cast<Element>(pa1);
      Ds(i, c) = static_cast<Element>(ds0);
      Ds(i, c + 1) = static_cast<Element>(ds1);
      const int dcol = int(get<1>(cS(i, c))) - int(get<1>(cS(i, 0)));  // a constant: 8 (c / 2)
      *reinterpret_cast<uint32_t*>(reinterpret_cast<unsigned char*>(ds_ptr) + (ds_off[i] ^ uint32_t(2 * dcol))) =
          mma16::pack2<T>(ds0, ds1);
    };
    if (uniform_r >= 0 && active) {
      // one region: per column pair one float2 of each coefficient, shared by the thread's 2 keys (the columns of
      // rows 0 and 1 are the same: check_sm90_layouts.cc, S^T rows)
      const float* ref_r = sRef + uniform_r * BM;
      const float* a_r = sA + uniform_r * BM;
      const float* b_r = sB + uniform_r * BM;
#pragma unroll
      for (int c2 = 0; c2 < NQC / 2; ++c2) {
        const int c = 2 * c2;
        const int col = int(get<1>(cS(0, c)));  // even; column c + 1 is col + 1
        const float2 rf = *reinterpret_cast<const float2*>(ref_r + col);
        const float2 ca = *reinterpret_cast<const float2*>(a_r + col);
        const float2 cb = *reinterpret_cast<const float2*>(b_r + col);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float p0 = mma16::exp2_ftz(fmaf(S(i, c), p.scale_log2, -rf.x));
          const float p1 = mma16::exp2_ftz(fmaf(S(i, c + 1), p.scale_log2, -rf.y));
          put(i, c, p0 * ca.x, p1 * ca.y, p0 * fmaf(ca.x, dP(i, c), -cb.x), p1 * fmaf(ca.y, dP(i, c + 1), -cb.y));
        }
      }
    } else if (active) {
      // the generic path: the region of every element (bwd_mma_kernel.cuh), zero where no candidate sees it
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int c2 = 0; c2 < NQC / 2; ++c2) {
          const int c = 2 * c2;
          float pa[2] = {0.f, 0.f}, ds[2] = {0.f, 0.f};
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = int(get<1>(cS(i, c))) + e;
            const int t = m0 + col, j = key[i];
            if (t < p.seq && j < p.seq && j <= t) {
              // kLean: every distance here lies in [d_min, d_max], so only the edges between their bands count
              int band;
              if constexpr (kLean) {
                band = band_at_min;
                for (int e = band_at_min; e < band_at_max; ++e) band += t - j >= p.band_edges[e];
              } else {
                band = band_of(p, t - j);
              }
              const int r = band * (p.num_sinks + 1) + level[i];
              if (p.membership[r] != 0) {
                const float prob = mma16::exp2_ftz(fmaf(S(i, c + e), p.scale_log2, -sRef[r * BM + col]));
                const float ca = sA[r * BM + col];
                pa[e] = prob * ca;
                ds[e] = prob * fmaf(ca, dP(i, c + e), -sB[r * BM + col]);
              }
            }
          }
          put(i, c, pa[0], pa[1], ds[0], ds[1]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int c2 = 0; c2 < NQC / 2; ++c2) put(i, 2 * c2, 0.f, 0.f, 0.f, 0.f);
    }
    cutlass::arch::fence_view_async_shared();  // dS (generic-proxy stores) before the wgmma reads it

    // dV += pa^T dY, dK += dS^T Q (RS: A from the registers above)
    Tensor tdVrPa = make_tensor(tPa.data(), sm90::acc_as_a(tPa.layout()));
    Tensor tdKrDs = make_tensor(tDs.data(), sm90::acc_as_a(tDs.layout()));
    sm90::wg_gemm_issue<false>(mma_dkv, tdVrPa, tdVrdY(_, _, _, stage), tdVrdV);
    sm90::wg_gemm_issue<false>(mma_dkv, tdKrDs, tdKrQ(_, _, _, stage), tdKrdK);

    // dQ = dS K once the dS it reads is in sdS: both warpgroups' (D 128) or this warpgroup's (D 64)
    if constexpr (kDqSplitK) cutlass::arch::NamedBarrier::sync(128, Tr::kBarDs + cwg);
    else cutlass::arch::NamedBarrier::sync(NC, Tr::kBarDs);
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<BM>, Int<D>>{});
    sm90::wg_gemm_issue<true>(mma_dq, tdQrdS, tdQrK, tdQrdQ);
    warpgroup_wait<0>();  // dV, dK and dQ complete: Q / dY of this stage and sdS no longer read
    warpgroup_fence_operand(tdVrdV);
    warpgroup_fence_operand(tdKrdK);
    warpgroup_fence_operand(tdQrdQ);
    warpgroup_fence_operand(tdVrPa);
    warpgroup_fence_operand(tdKrDs);
    pipeline.consumer_release(state);
    ++state;

    // dQ (times scale) into dq_accum [B, T, Hq, D] fp32 by float2 atomics (kDqBulk: into the shared buffer, which
    // the writer warp adds by bulk reduce-add)
    Tensor dQ = make_tensor(tdQrdQ.data(), sm90::acc_rowcol(tdQrdQ.layout()));
    Tensor cQ_part = thr_dq.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cQ = make_tensor(cQ_part.data(), sm90::acc_rowcol(cQ_part.layout()));
    if constexpr (kDqBulk) {
      cutlass::arch::NamedBarrier::sync(NC + 32, Tr::kBarDqEmpty);  // the previous step's copies have read it
      float* buf = sdq + (kDqSplitK ? cwg * BM * Tile::kDqLd : 0);  // D 64: this warpgroup's partial sums
#pragma unroll
      for (int i = 0; i < decltype(size<0>(dQ))::value; ++i) {
        float* row = buf + int(get<0>(cQ(i, 0))) * Tile::kDqLd;  // rows t >= T are written, never copied
#pragma unroll
        for (int c2 = 0; c2 < decltype(size<1>(dQ))::value / 2; ++c2)
          *reinterpret_cast<float2*>(row + int(get<1>(cQ(i, 2 * c2)))) =
              make_float2(dQ(i, 2 * c2) * p.scale, dQ(i, 2 * c2 + 1) * p.scale);
      }
      cutlass::arch::fence_view_async_shared();  // the generic-proxy stores, before the bulk copies read them
      cutlass::arch::NamedBarrier::arrive(NC + 32, Tr::kBarDqFull);
    } else {
#pragma unroll
      for (int i = 0; i < decltype(size<0>(dQ))::value; ++i) {
        const int t = m0 + int(get<0>(cQ(i, 0)));
        if (t >= p.seq) continue;
        float* dst = p.dq_accum + ((int64_t(b) * p.seq + t) * p.heads_q + h) * D;
#pragma unroll
        for (int c2 = 0; c2 < decltype(size<1>(dQ))::value / 2; ++c2)
          atomic_add2(dst + int(get<1>(cQ(i, 2 * c2))), dQ(i, 2 * c2) * p.scale, dQ(i, 2 * c2 + 1) * p.scale);
      }
    }
  }

  // dK (times scale), dV: fp32; with GQA added by atomics into [B, T, Hkv, D] (dk_accum / dv_accum: the group's
  // query heads sum there, in L2, instead of in a pass over per-head copies afterwards), else per query head
  Tensor dV = make_tensor(tdVrdV.data(), sm90::acc_rowcol(tdVrdV.layout()));
  Tensor dK = make_tensor(tdKrdK.data(), sm90::acc_rowcol(tdKrdK.layout()));
  Tensor cKV_part = thr_dkv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  Tensor cKV = make_tensor(cKV_part.data(), sm90::acc_rowcol(cKV_part.layout()));
#pragma unroll
  for (int i = 0; i < decltype(size<0>(dV))::value; ++i) {
    const int j = j0 + int(get<0>(cKV(i, 0)));
    if (j >= p.seq) continue;
    if (p.dk_accum != nullptr) {  // block-uniform
      const int64_t out = ((int64_t(b) * p.seq + j) * (p.heads_q / p.group) + hk) * D;
#pragma unroll
      for (int c2 = 0; c2 < decltype(size<1>(dV))::value / 2; ++c2) {
        const int d = int(get<1>(cKV(i, 2 * c2)));
        atomic_add2(p.dk_accum + out + d, dK(i, 2 * c2) * p.scale, dK(i, 2 * c2 + 1) * p.scale);
        atomic_add2(p.dv_accum + out + d, dV(i, 2 * c2), dV(i, 2 * c2 + 1));
      }
      continue;
    }
    const int64_t out = ((int64_t(b) * p.seq + j) * p.heads_q + h) * D;
#pragma unroll
    for (int c2 = 0; c2 < decltype(size<1>(dV))::value / 2; ++c2) {
      const int d = int(get<1>(cKV(i, 2 * c2)));
      *reinterpret_cast<float2*>(p.dk + out + d) = make_float2(dK(i, 2 * c2) * p.scale, dK(i, 2 * c2 + 1) * p.scale);
      *reinterpret_cast<float2*>(p.dv + out + d) = make_float2(dV(i, 2 * c2), dV(i, 2 * c2 + 1));
    }
  }
#endif
}

}  // namespace dash
