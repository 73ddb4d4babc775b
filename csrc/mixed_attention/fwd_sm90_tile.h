// Tile sizes and shared-memory bytes of the Hopper forward (fwd_sm90_kernel.cuh), without the CuTe headers, so that
// the host's shared-memory report (bwd.cu: shared_memory_bytes) and the launcher agree on one number.
#pragma once

#include <cstddef>

namespace dash {

template <int D>
struct FwdSm90Tile {
  static constexpr int kBlockM = 128;  // query rows per block: 2 consumer warpgroups x 64 rows (one wgmma atom each)
  static constexpr int kBlockN = 64;   // keys per tile
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;  // no producer warp: every thread issues cp.async
  // K / V stages: 3, because the overlapped walk (Sm90Fwd::kTmaOverlap) holds a tile's stage until its P V product,
  // issued one tile late, completes; with 2 the next load could only start then and each tile would wait for it
  static constexpr int kStages = 3;
  static constexpr size_t kQBytes = size_t(kBlockM) * D * 2;       // 128B-swizzled, no padding
  static constexpr size_t kKVBytes = size_t(kBlockN) * D * 2;      // one K or V tile of one stage
  static constexpr bool kYShared = D > 64;                          // as in fwd_mma_kernel.cuh
  static constexpr size_t kYBytes = kYShared ? size_t(kBlockM) * D * 4 : 0;
  static constexpr size_t kAlign = 1024;  // the 128B swizzle needs 1024-byte aligned tiles: base rounded up
  // Q, K and V of three stages, Y, the alignment slack: 197,632 B at D 128, 66,560 B at D 64
  static constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kKVBytes + kYBytes + kAlign;
  // The TMA variant (DASH_CUDA_FWD=sm90tma): a third warpgroup whose one thread issues the K / V loads by TMA into
  // the same stages, an mbarrier pipeline (full / empty barrier per stage: 32 B, 64 reserved)
  static constexpr int kThreadsTma = kThreads + 128;
  static constexpr size_t kPipelineBytes = 64;
  static constexpr size_t kSmemBytesTma = kSmemBytes + kPipelineBytes;
};

// The four ways the Hopper forward runs (DASH_CUDA_FWD, fwd.cu; unset on sm_90: kTmaOverlap, the fastest measured):
//   kCpAsync    (sm90):        K / V by cp.async from the consumers; every product waited for where it is issued;
//   kTma        (sm90tma):     K / V by TMA from a producer warpgroup; every product waited for where it is issued;
//   kTmaOverlap (sm90overlap): the TMA loads, and the walk's plain tiles pipelined as FlashAttention-3's
//                              IntraWGOverlap: tile n + 1's S = Q K^T and tile n's O += P V issued together, tile
//                              n + 1's softmax computed while the P V runs;
//   kTmaPingPong (sm90pingpong): the overlapped walk, and the two consumer warpgroups taking turns to issue their
//                              products (FA3's warp-scheduler barriers), one's softmax during the other's products;
//   kTmaLean    (sm90lean):    the overlapped walk with fewer instructions per tile (fwd_sm90_kernel.cuh, kLean;
//                              scale > 0 only).
enum class Sm90Fwd { kCpAsync, kTma, kTmaOverlap, kTmaPingPong, kTmaLean };

}  // namespace dash
