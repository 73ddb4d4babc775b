// Host-side check of the CuTe mappings fwd_sm90_kernel.cuh relies on (no GPU needed): for every one of the 256
// threads, (1) the P registers, built in S's accumulator layout and viewed by acc_as_a, hold exactly the (row, key)
// coordinates the RS wgmma of P V expects of its A operand (partition_A of an identity tensor); (2) each thread's
// two rows lie in its warpgroup's 64, O and S agree on them, the 4 threads of a quad share them, the LSE writer is
// lane % 4 == 0, O's column pairs are adjacent; (3) S and O cover their tiles; (4) the swizzled K and V^T
// addresses the cp.async loader writes (&sK(r, c, stage), &sVt(c, r, stage)) are a bijection onto the stage
// buffers with every 16-byte chunk contiguous. A CUDA source (.cc so that the extension's *.cu glob skips it):
//   nvcc -x cu -std=c++20 -I csrc -I $CUTLASS_INCLUDE --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -o /tmp/check_sm90_layouts csrc/tools/check_sm90_layouts.cc && /tmp/check_sm90_layouts
// Expected: "bad 0" and "non-contiguous: 0" on every line, exit status 0.

#include <cstdio>
#include <set>
#include "mixed_attention/fwd_sm90_kernel.cuh"
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
int main() { return run<__nv_bfloat16, 64>() + run<__nv_bfloat16, 128>() + run<__half, 128>(); }
