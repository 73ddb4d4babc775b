# Two pieces of bookkeeping of the lean sm90 backward (bwd_sm90_kernel.cuh, kLean), against what they replace.
# 1. issue_coef: each consumer thread copies query column ctid % BM of every
# (NC / BM)-th row block rb of the 3 R coefficient rows, with rb / R and rb % R kept by counting. Checks that this
# copies exactly what the division form (idx = ctid + k NC: which = idx / (R BM), r = idx / BM % R, tl = idx % BM)
# copied, each element once, for every region count.
# 2. The bands of the warp's smallest and largest distance, counted up over the walk (band_at_min / band_at_max),
# and each element's band as band_at_min plus the edges between them: equal to band_of for random edge sets.
# Usage: python csrc/tools/sim_bwd_sm90_lean.py (~15 s).
BM, NC = 64, 256
for R in range(1, 100):
    old = {}
    for ctid in range(NC):
        for idx in range(ctid, 3 * R * BM, NC):
            old[idx] = (idx // (R * BM), (idx // BM) % R, idx % BM)
    new = {}
    for ctid in range(NC):
        tl = ctid % BM
        which, r = 0, ctid // BM
        while r >= R and which < 3:
            r -= R; which += 1
        rb = ctid // BM
        while rb < 3 * R:
            idx = rb * BM + tl
            assert idx not in new
            new[idx] = (which, r, tl)
            r += NC // BM
            while r >= R:
                r -= R; which += 1
            rb += NC // BM
    assert old == new, R
print("issue_coef: the counted (which, r) equal the divided ones for R = 1 .. 99")

import random

rng = random.Random(1)
for trial in range(800):
    nb = rng.randint(0, 8)
    edges = sorted(rng.sample(range(1, 3000), nb))
    band_of = lambda d: sum(d >= e for e in edges)  # noqa: E731
    jw0 = rng.randrange(0, 2000)  # the warp's first key
    seq = rng.randrange(jw0 + 16, jw0 + 3000)
    bmin = bmax = 0
    m0 = (jw0 // 128 * 128) // 64 * 64  # m_begin: the query tile holding the block's first key
    while m0 < seq:
        t_last = min(m0 + 63, seq - 1)
        d_min, d_max = m0 - (jw0 + 15), t_last - jw0
        while bmin < nb and d_min >= edges[bmin]:
            bmin += 1
        while bmax < nb and d_max >= edges[bmax]:
            bmax += 1
        assert bmin == band_of(d_min) and bmax == band_of(d_max)
        for t in range(m0, t_last + 1):
            for j in range(jw0, min(jw0 + 16, t + 1)):
                assert bmin + sum(t - j >= edges[e] for e in range(bmin, bmax)) == band_of(t - j)
        m0 += 64
print("bands: the counted ones equal band_of on 800 random walks")
