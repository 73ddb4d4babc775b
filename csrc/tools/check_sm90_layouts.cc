// Host-side check of the CuTe mappings fwd_sm90_kernel.cuh relies on (no GPU needed): for every one of the 256
// threads, (1) the P registers, built in S's accumulator layout and viewed by acc_as_a, hold exactly the (row, key)
// coordinates the RS wgmma of P V expects of its A operand (partition_A of an identity tensor); (2) each thread's
// two rows lie in its warpgroup's 64, O and S agree on them, the 4 threads of a quad share them, the LSE writer is
// lane % 4 == 0, O's column pairs are adjacent; (3) S and O cover their tiles; (4) the swizzled K and V^T
// addresses the cp.async loader writes (&sK(r, c, stage), &sVt(c, r, stage)) are a bijection onto the stage
// buffers with every 16-byte chunk contiguous; and, for the backward (bwd_sm90_kernel.cuh), (b1) .. (b5) of
// run_bwd below. A CUDA source (.cc so that the extension's *.cu glob skips it):
//   nvcc -x cu -std=c++20 -I csrc -I $CUTLASS_INCLUDE --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -o /tmp/check_sm90_layouts csrc/tools/check_sm90_layouts.cc && /tmp/check_sm90_layouts
// Expected: "bad 0" and "non-contiguous: 0" on every line, exit status 0.

#include <cstdio>
#include <set>
#include "mixed_attention/fwd_sm90_kernel.cuh"
#include "mixed_attention/bwd_sm90_kernel.cuh"
using namespace cute;
template <typename T, int D>
int run() {
  using Tr = dash::sm90::Traits<T, D>;
  constexpr int BM = 128, BN = 64;
  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  int bad = 0;
  std::set<std::pair<int,int>> seenS, seenO;
  for (int tid = 0; tid < 256; ++tid) {
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
    Tensor cS_part = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    Tensor cO_part = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cS = make_tensor(cS_part.data(), dash::sm90::acc_rowcol(cS_part.layout()));
    Tensor cO = make_tensor(cO_part.data(), dash::sm90::acc_rowcol(cO_part.layout()));
    // A operand coordinates of the PV product (m, k) for this thread
    Tensor cA = thr_pv.partition_A(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    // our P view: cS_part's layout reinterpreted as A regs: same storage
    auto aregs = dash::sm90::acc_as_a(tSrS.layout());
    if (size(aregs) != size(cA)) { printf("size mismatch\n"); return 1; }
    // storage offset s of S holds coordinate cS_part(idx) where layout(idx)=s. A view: element j of cA has storage aregs(j).
    // build storage->coord map for S
    std::pair<int,int> st[256];
    for (int i = 0; i < size(tSrS); ++i) { auto c = cS_part(i); st[tSrS.layout()(i)] = {int(get<0>(c)), int(get<1>(c))}; }
    for (int j = 0; j < size(cA); ++j) {
      auto c = cA(j); auto s = st[aregs(j)];
      if (s.first != int(get<0>(c)) || s.second != int(get<1>(c))) { if (bad++ < 5) printf("tid %d j %d: A wants (%d,%d), P holds (%d,%d)\n", tid, j, int(get<0>(c)), int(get<1>(c)), s.first, s.second); }
    }
    int wg = tid / 128, lane = tid % 32;
    for (int i = 0; i < 2; ++i) {
      int r = get<0>(cS(i, 0));
      if (r / 64 != wg) { if (bad++ < 5) printf("tid %d row %d not in wg %d\n", tid, r, wg); }
      if (int(get<0>(cO(i, 0))) != r) { if (bad++ < 5) printf("tid %d: O row differs\n", tid); }
      for (int c = 0; c < size<1>(cS); ++c) { if (int(get<0>(cS(i,c))) != r) bad++; seenS.insert({r, int(get<1>(cS(i,c)))}); }
      for (int c = 0; c < size<1>(cO); ++c) {
        if (int(get<0>(cO(i,c))) != r) bad++;
        seenO.insert({r, int(get<1>(cO(i,c)))});
        if (c % 2 == 1 && int(get<1>(cO(i,c))) != int(get<1>(cO(i,c-1))) + 1) { if (bad++ < 5) printf("pair not adjacent\n"); }
        if (c % 2 == 0 && int(get<1>(cO(i,c))) != int(get<1>(cO(0,c)))) bad++;
      }
      // quad shares rows
    }
    if ((int(get<1>(cO(0,0))) == 0) != (lane % 4 == 0)) { if (bad++ < 5) printf("lse writer mismatch tid %d\n", tid); }
    // rows shared by the quad: row of lane and lane^1, lane^2
  }
  // quad check
  for (int tid = 0; tid < 256; ++tid) for (int x : {1, 2, 3}) {
    auto a = mma_qk.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    auto b = mma_qk.get_thread_slice(tid ^ x).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    if (get<0>(a(0)) != get<0>(b(0))) { if (bad++ < 5) printf("quad rows differ %d\n", tid); }
  }
  printf("D %d: S covers %zu of %d, O covers %zu of %d, bad %d\n", D, seenS.size(), BM*BN, seenO.size(), BM*D, bad);
  // smem: address bijection
  std::vector<char> buf(1 << 20);
  char* base = (char*)(((uintptr_t)buf.data() + 1023) & ~uintptr_t(1023));
  using E = typename Tr::Element;
  Tensor sK = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutVt{});
  std::set<long> ak, av; int contig_bad = 0;
  for (int s = 0; s < 2; ++s) for (int r = 0; r < BN; ++r) for (int c = 0; c < D; ++c) {
    long a = (char*)&sK(r, c, s) - base; ak.insert(a);
    long b = (char*)&sVt(c, r, s) - base; av.insert(b);
    if (c % 8) { if ((char*)&sK(r,c,s) != (char*)&sK(r,c-1,s) + 2) contig_bad++; if ((char*)&sVt(c,r,s) != (char*)&sVt(c-1,r,s) + 2) contig_bad++; }
  }
  printf("K addrs %zu (max %ld) V addrs %zu (max %ld) expect %d; 16B chunks non-contiguous: %d\n", ak.size(), *ak.rbegin(), av.size(), *av.rbegin(), 2*BN*D, contig_bad);
  return bad;
}

// The backward (bwd_sm90_kernel.cuh), for the 256 consumer threads:
//  (b1) S^T = K Q^T's accumulator (keys x queries): each thread's 2 keys lie in [64 wg + 16 warp, + 16) (the
//       warp-uniform region test), its 16 query columns come in adjacent pairs (c even: col, col + 1), the
//       accumulators cover the 128 x 64 tile once;
//  (b2) pa / dS, rounded in S^T's register layout and viewed by acc_as_a, hold exactly the (key, query) the RS
//       wgmma of dV / dK expects of its A operand (partition_A of an identity tensor);
//  (b3) the transposed views are the same bytes: &sQt(d, m, s) == &sQ(m, d, s), &sKt(d, n) == &sK(n, d);
//  (b4) the dS stores: &sdS(col, key) and the next query are 2 bytes apart, 4-byte aligned, and the addresses are a
//       bijection onto the 16 KB buffer; D 64's per-warpgroup slices are sdS(_, 64 wg + k) and sKt(_, 64 wg + k);
//  (b5) dQ's accumulator (D 128: 256 threads split D; D 64: each warpgroup the whole 64 x 64) covers (BM, D) once
//       (per warpgroup at D 64), d in adjacent pairs, rows the same for a thread's columns; likewise dK / dV's
//       (keys x D) over the 128 x D tile, a thread's keys in its warpgroup's 64;
//  (b6) the XOR form of the dS store addresses (see the code).
template <typename T, int D>
int run_bwd() {
  using Tr = dash::sm90::BwdTraits<T, D>;
  using E = typename Tr::Element;
  constexpr int BM = Tr::BM, BN = Tr::BN;
  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;
  int bad = 0;
  auto fail = [&](const char* what, int tid, int a, int b) { if (bad++ < 8) printf("  %s: tid %d (%d, %d)\n", what, tid, a, b); };
  std::set<std::pair<int,int>> seenS, seenKV, seenQ[2];
  for (int tid = 0; tid < 256; ++tid) {
    const int wg = tid / 128, warp = (tid % 128) / 32;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_dkv = mma_dkv.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(Tr::kDqSplitK ? tid % 128 : tid);
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{});
    Tensor cS_part = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
    Tensor cS = make_tensor(cS_part.data(), dash::sm90::acc_rowcol(cS_part.layout()));
    // (b1)
    for (int i = 0; i < size<0>(cS); ++i) {
      const int key = get<0>(cS(i, 0));
      if (key < 64 * wg + 16 * warp || key >= 64 * wg + 16 * warp + 16) fail("S^T key outside the warp's 16", tid, key, i);
      for (int c = 0; c < size<1>(cS); ++c) {
        if (int(get<0>(cS(i, c))) != key) fail("S^T row varies", tid, i, c);
        if (c % 2 == 1 && int(get<1>(cS(i, c))) != int(get<1>(cS(i, c - 1))) + 1) fail("S^T pair not adjacent", tid, i, c);
        if (c % 2 == 0 && int(get<1>(cS(i, c))) % 2 != 0) fail("S^T pair not even", tid, i, c);
        if (!seenS.insert({key, int(get<1>(cS(i, c)))}).second) fail("S^T element twice", tid, i, c);
      }
    }
    // (b2)
    Tensor cA = thr_dkv.partition_A(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
    auto aregs = dash::sm90::acc_as_a(tSrS.layout());
    if (size(aregs) != size(cA)) { printf("  dKV A size mismatch %d vs %d\n", int(size(aregs)), int(size(cA))); return 1; }
    std::pair<int,int> st[256];
    for (int e = 0; e < size(tSrS); ++e) { auto c = cS_part(e); st[tSrS.layout()(e)] = {int(get<0>(c)), int(get<1>(c))}; }
    for (int e = 0; e < size(cA); ++e) {
      auto c = cA(e); auto s = st[aregs(e)];
      if (s.first != int(get<0>(c)) || s.second != int(get<1>(c))) fail("dKV A operand != S^T register", tid, e, s.first);
    }
    // (b5) dK / dV
    Tensor cKV_part = thr_dkv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
    Tensor cKV = make_tensor(cKV_part.data(), dash::sm90::acc_rowcol(cKV_part.layout()));
    for (int i = 0; i < size<0>(cKV); ++i) {
      const int key = get<0>(cKV(i, 0));
      if (key / 64 != wg) fail("dKV key outside the warpgroup", tid, key, i);
      for (int c = 0; c < size<1>(cKV); ++c) {
        if (int(get<0>(cKV(i, c))) != key) fail("dKV row varies", tid, i, c);
        if (c % 2 == 1 && int(get<1>(cKV(i, c))) != int(get<1>(cKV(i, c - 1))) + 1) fail("dKV pair", tid, i, c);
        if (!seenKV.insert({key, int(get<1>(cKV(i, c)))}).second) fail("dKV element twice", tid, i, c);
      }
    }
    // (b5) dQ
    Tensor cQ_part = thr_dq.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cQ = make_tensor(cQ_part.data(), dash::sm90::acc_rowcol(cQ_part.layout()));
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<BM>, Int<D>>{});
    if (size(tdQrdQ) != size(cQ_part)) fail("dQ fragment size", tid, int(size(tdQrdQ)), int(size(cQ_part)));
    for (int i = 0; i < size<0>(cQ); ++i)
      for (int c = 0; c < size<1>(cQ); ++c) {
        if (int(get<0>(cQ(i, c))) != int(get<0>(cQ(i, 0)))) fail("dQ row varies", tid, i, c);
        if (c % 2 == 1 && int(get<1>(cQ(i, c))) != int(get<1>(cQ(i, c - 1))) + 1) fail("dQ pair", tid, i, c);
        if (!seenQ[Tr::kDqSplitK ? wg : 0].insert({int(get<0>(cQ(i, c))), int(get<1>(cQ(i, c)))}).second) fail("dQ element twice", tid, i, c);
      }
  }
  const int q_groups = Tr::kDqSplitK ? 2 : 1;
  size_t q_cover = seenQ[0].size() + (Tr::kDqSplitK ? seenQ[1].size() : 0);
  if (seenS.size() != size_t(BN * BM)) fail("S^T coverage", 0, int(seenS.size()), BN * BM);
  if (seenKV.size() != size_t(BN * D)) fail("dKV coverage", 0, int(seenKV.size()), BN * D);
  if (q_cover != size_t(q_groups * BM * D)) fail("dQ coverage", 0, int(q_cover), q_groups * BM * D);
  // (b3), (b4): addresses
  std::vector<char> buf(1 << 20);
  char* base = (char*)(((uintptr_t)buf.data() + 1023) & ~uintptr_t(1023));
  // (b6) the kernel's dS store addresses: ds_off[i] (the thread's first pair of key i) XOR 2 x the column distance
  // is &sdS(col, key) for every element; rows 0 and 1 of a thread share their columns (the uniform path's
  // coefficient pairs)
  int xor_bad = 0;
  {
    Tensor sdS0 = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutdS{});
    for (int tid = 0; tid < 256; ++tid) {
      auto thr_sdp = mma_sdp.get_thread_slice(tid);
      Tensor cS_part = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
      Tensor cS = make_tensor(cS_part.data(), dash::sm90::acc_rowcol(cS_part.layout()));
      for (int i = 0; i < 2; ++i) {
        const uint32_t off = uint32_t((char*)&sdS0(int(get<1>(cS(i, 0))), int(get<0>(cS(i, 0)))) - base);
        for (int c = 0; c < size<1>(cS); c += 2) {
          const int dcol = int(get<1>(cS(i, c))) - int(get<1>(cS(i, 0)));
          if (dcol != 4 * c) xor_bad++;  // the kernel's comment: 8 (c / 2)
          if (int(get<1>(cS(i, c))) != int(get<1>(cS(0, c)))) xor_bad++;
          const uint32_t want = uint32_t((char*)&sdS0(int(get<1>(cS(i, c))), int(get<0>(cS(i, c)))) - base);
          if ((off ^ uint32_t(2 * dcol)) != want) { if (xor_bad++ < 4) printf("  xor: tid %d i %d c %d\n", tid, i, c); }
        }
      }
    }
  }
  Tensor sK = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutKt{});
  Tensor sQ = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutQt{});
  Tensor sdS = make_tensor(make_smem_ptr((E*)base), typename Tr::SmemLayoutdS{});
  int view_bad = 0, ds_bad = 0;
  for (int n = 0; n < BN; ++n) for (int d = 0; d < D; ++d) if (&sKt(d, n) != &sK(n, d)) view_bad++;
  for (int s = 0; s < 2; ++s) for (int m = 0; m < BM; ++m) for (int d = 0; d < D; ++d) if (&sQt(d, m, s) != &sQ(m, d, s)) view_bad++;
  std::set<long> ads;
  for (int q = 0; q < BM; ++q) for (int k = 0; k < BN; ++k) {
    long a = (char*)&sdS(q, k) - base;
    ads.insert(a);
    if (a < 0 || a >= BM * BN * 2) ds_bad++;
    if (q % 2 == 0 && ((char*)&sdS(q + 1, k) != (char*)&sdS(q, k) + 2 || a % 4 != 0)) ds_bad++;
  }
  if (ads.size() != size_t(BM * BN)) ds_bad++;
  if constexpr (Tr::kDqSplitK) {
    for (int w = 0; w < 2; ++w) {
      Tensor sl = local_tile(sdS, Shape<Int<BM>, Int<BN / 2>>{}, make_coord(_0{}, w));
      Tensor kl = local_tile(sKt, Shape<Int<D>, Int<BN / 2>>{}, make_coord(_0{}, w));
      for (int q = 0; q < BM; ++q) for (int k = 0; k < BN / 2; ++k) if (&sl(q, k) != &sdS(q, 64 * w + k)) view_bad++;
      for (int d = 0; d < D; ++d) for (int k = 0; k < BN / 2; ++k) if (&kl(d, k) != &sKt(d, 64 * w + k)) view_bad++;
    }
  }
  printf("bwd D %d: S^T covers %zu of %d, dK/dV %zu of %d, dQ %zu of %d, bad %d; transposed views bad %d; dS stores bad %d; "
         "dS xor addresses bad %d\n",
         D, seenS.size(), BN * BM, seenKV.size(), BN * D, q_cover, q_groups * BM * D, bad, view_bad, ds_bad, xor_bad);
  return bad + view_bad + ds_bad + xor_bad;
}
int main() {
  return run<__nv_bfloat16, 64>() + run<__nv_bfloat16, 128>() + run<__half, 128>() + run_bwd<__nv_bfloat16, 64>() +
         run_bwd<__nv_bfloat16, 128>() + run_bwd<__half, 64>() + run_bwd<__half, 128>();
}
