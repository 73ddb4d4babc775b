# The sm90 backward's issue_coef (bwd_sm90_kernel.cuh): each consumer thread copies query column ctid % BM of every
# (NC / BM)-th row block rb of the 3 R coefficient rows, with rb / R and rb % R kept by counting. Checks that this
# copies exactly what the division form (idx = ctid + k NC: which = idx / (R BM), r = idx / BM % R, tl = idx % BM)
# copied, each element once, for every region count. Usage: python csrc/tools/sim_bwd_sm90_coef.py (a second).
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
