// Tile sizes and shared-memory bytes of the Hopper backward (bwd_sm90_kernel.cuh, DASH_CUDA_BWD=sm90), without the
// CuTe headers, so that the host's dispatch (bwd.cu: which backward runs) and the launcher agree on one number.
#pragma once

#include <cstddef>

namespace dash {

template <int D>
struct BwdSm90Tile {
  static constexpr int kBlockM = 64;   // queries per step of the walk (one 64-column S^T atom per warpgroup)
  static constexpr int kBlockN = 128;  // keys per block: 2 consumer warpgroups x 64 keys
  static constexpr int kStages = 2;    // Q and dY double-buffered (one TMA pipeline carries both)
  static constexpr int kConsumers = 256;            // 2 MMA warpgroups
  static constexpr int kThreads = kConsumers + 128;  // + the producer warpgroup (warpgroup 0)
  static constexpr size_t kQBytes = size_t(kBlockM) * D * 2;   // one stage of Q or of dY (128B-swizzled)
  static constexpr size_t kKBytes = size_t(kBlockN) * D * 2;   // K or V
  static constexpr size_t kDsBytes = size_t(kBlockM) * kBlockN * 2;  // dS, one stage (see the kernel: why one)
  static constexpr size_t kAlign = 1024;        // the 128B swizzle needs 1024-byte aligned tiles: base rounded up
  static constexpr size_t kBarrierBytes = 128;  // the Q/dY pipeline (2 stages x full / empty) + the K/V barrier
  // K, V, two stages of Q and of dY, dS, barriers, alignment slack: 148,608 B at D 128, 83,072 B at D 64; then
  // two stages of the query tile's region coefficients (ref, A, B: 3 R kBlockM floats a stage)
  static constexpr size_t kBaseBytes = 2 * kKBytes + 2 * kStages * kQBytes + kDsBytes + kBarrierBytes + kAlign;
  static constexpr size_t coef_bytes(int num_regions) { return size_t(3) * num_regions * kBlockM * 4; }
  // DASH_CUDA_BWD=sm90dq: the step's dQ in fp32 for the bulk reduce-add, rows padded by 8 floats (a quad's row
  // pairs then fall in distinct banks); D 64 holds both warpgroups' partial sums (their keys' halves)
  static constexpr int kDqLd = D + 8;
  static constexpr int kDqBuffers = D == 64 ? 2 : 1;
  static constexpr size_t kDqBytes = size_t(kDqBuffers) * kBlockM * kDqLd * 4;
  static constexpr size_t smem_bytes(int num_regions, bool dq_bulk = false) {
    return kBaseBytes + (dq_bulk ? kDqBytes : 0) + kStages * coef_bytes(num_regions);
  }
};

// The Hopper backward's variants (DASH_CUDA_BWD, bwd.cu): kPlain (sm90), kLean (sm90lean: the coefficient copies
// without divisions), kLeanDqBulk (sm90dq: that, and dQ by bulk reduce-add from shared memory instead of atomics).
enum class Sm90Bwd { kPlain, kLean, kLeanDqBulk };

}  // namespace dash
