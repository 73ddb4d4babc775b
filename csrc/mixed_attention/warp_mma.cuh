// Warp-level tensor-core products on shared-memory tiles (nvcuda::wmma, 16-bit inputs, fp32 accumulation), used by
// the forward and the backward. Each warp of the block owns 16 consecutive rows of the left operand (rows
// 16 * warp ...); pitches are in elements and keep every fragment pointer 256-bit aligned.
#pragma once

#include <mma.h>

namespace dash {

// C[16 rows of this warp, N] = A[rows, D] B[N, D]^T, both 16-bit row-major (pitch LD_H); C fp32 (pitch LD_C).
template <typename T, int D, int N, int LD_H, int LD_C>
__device__ __forceinline__ void warp_abt(const T* sA, const T* sB, float* sC) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B^T: B is row-major [n, d]
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
#pragma unroll
  for (int nf = 0; nf < N / 16; ++nf) {
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wmma::load_matrix_sync(a, sA + warp * 16 * LD_H + kk * 16, LD_H);
      wmma::load_matrix_sync(b, sB + nf * 16 * LD_H + kk * 16, LD_H);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(sC + warp * 16 * LD_C + nf * 16, c, LD_C, wmma::mem_row_major);
  }
}

// acc[16 rows of this warp, D] += P[rows, K] X[K, D]: P 16-bit (pitch LD_P), X 16-bit (pitch LD_H), both row-major;
// acc fp32 in shared memory (pitch LD_A).
template <typename T, int D, int K, int LD_P, int LD_H, int LD_A>
__device__ __forceinline__ void warp_accumulate(const T* sP, const T* sX, float* sAcc) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
#pragma unroll
  for (int df = 0; df < D / 16; ++df) {
    float* tile = sAcc + warp * 16 * LD_A + df * 16;
    wmma::load_matrix_sync(c, tile, LD_A, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      wmma::load_matrix_sync(a, sP + warp * 16 * LD_P + kk * 16, LD_P);
      wmma::load_matrix_sync(b, sX + kk * 16 * LD_H + df * 16, LD_H);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(tile, c, LD_A, wmma::mem_row_major);
  }
}

}  // namespace dash
