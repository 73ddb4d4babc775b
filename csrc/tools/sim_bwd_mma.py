# Lane-by-lane fp64 simulation of mixed_attention_bwd_dkdv_mma_kernel (bwd_mma_kernel.cuh): ldmatrix (.trans),
# mma.m16n8k16 fragment layouts from the PTX ISA, the kernel's byte addresses, masks, coefficient staging,
# dQ atomics. Compared against an independent dense fp64 reference of the mixed attention gradients (per
# candidate softmax autograd formulas, GQA sums). Shared memory starts as NaN (padding included), so a read of
# an unwritten or padding element poisons the result; warps run one after another, so races are not modelled.
# Mirror any index change of the kernel here. Usage: python csrc/tools/sim_bwd_mma.py [--quick] (a few minutes).
import numpy as np
import sys

FULL = 1 << 30
COUNT = {}


def reference(q, k, v, w, windows, sinks, dy, scale):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    grp = Hq // Hkv
    C = len(windows)
    dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v)
    t = np.arange(T)[:, None]; j = np.arange(T)[None, :]
    for b in range(B):
        for h in range(Hq):
            hk = h // grp
            S = scale * q[b, :, h] @ k[b, :, hk].T
            for c in range(C):
                mask = (j <= t) & ((t - j < windows[c]) | (j < sinks[c]))
                Sm = np.where(mask, S, -np.inf)
                m = Sm.max(1, keepdims=True)
                P = np.exp(Sm - m); P /= P.sum(1, keepdims=True)
                O = P @ v[b, :, hk]
                dO = w[h, c] * dy[b, :, h]
                dv[b, :, hk] += P.T @ dO
                dP = dO @ v[b, :, hk].T
                Dc = (dO * O).sum(1, keepdims=True)
                dS = P * (dP - Dc)
                dq[b, :, h] += scale * dS @ k[b, :, hk]
                dk[b, :, hk] += scale * dS.T @ q[b, :, h]
    return dq, dk, dv


def forward_lse_o(q, k, v, windows, sinks, scale):
    B, T, Hq, D = q.shape
    grp = Hq // k.shape[2]
    C = len(windows)
    lse = np.zeros((B, Hq, C, T)); O = np.zeros((C, B, T, Hq, D))
    t = np.arange(T)[:, None]; j = np.arange(T)[None, :]
    for b in range(B):
        for h in range(Hq):
            s2 = scale * np.log2(np.e) * q[b, :, h] @ k[b, :, h // grp].T
            for c in range(C):
                mask = (j <= t) & ((t - j < windows[c]) | (j < sinks[c]))
                Sm = np.where(mask, s2, -np.inf)
                m = Sm.max(1, keepdims=True)
                l = np.exp2(Sm - m).sum(1, keepdims=True)
                lse[b, h, c] = (m + np.log2(l))[:, 0]
                O[c, b, :, h] = (np.exp2(Sm - m) / l) @ v[b, :, h // grp]
    return lse, O


def host_tables(windows, sinks):
    has_full = any(W >= FULL for W in windows)
    bands = sorted(set(W for W in windows if W < FULL))
    sink_edges = sorted(set(s for s in sinks if s > 0))
    nb, ns = len(bands), len(sink_edges)
    membership = []
    for band in range(nb + 1):
        band_lo = 0 if band == 0 else bands[band - 1]
        for level in range(ns + 1):
            sink_hi = 0 if level == 0 else sink_edges[ns - level]
            bits = 0
            for c in range(len(windows)):
                if windows[c] > band_lo or (sink_hi > 0 and sinks[c] >= sink_hi):
                    bits |= 1 << c
            membership.append(bits)
    return dict(has_full=int(has_full), bands=bands, sink_edges=sink_edges, membership=membership,
                R=(nb + 1) * (ns + 1), widest=bands[-1] if nb else 1, max_sink=sink_edges[-1] if ns else 0)


def prep(tab, lse, O, dy, w):
    B, Hq, C, T = lse.shape
    R = tab['R']
    delta = np.einsum('cbthd,bthd->bhct', O, dy)
    ref = np.zeros((B, Hq, R, T)); A = np.zeros_like(ref); Bc = np.zeros_like(ref)
    for r in range(R):
        mem = [c for c in range(C) if tab['membership'][r] >> c & 1]
        if not mem:
            ref[:, :, r] = np.inf
            continue
        rf = np.min(lse[:, :, mem], axis=2)
        ref[:, :, r] = rf
        for c in mem:
            term = w[:, c][None, :, None] * np.exp2(rf - lse[:, :, c])
            A[:, :, r] += term
            Bc[:, :, r] += term * delta[:, :, c]
    return ref, A, Bc


# ---- lane-level primitives -------------------------------------------------------------------------------
LANES = np.arange(32)
G = LANES >> 2
Q4 = LANES & 3


class Smem:
    """16-bit region as an array indexed by byte address / 2."""

    def __init__(self, nbytes):
        self.h = np.full(nbytes // 2, np.nan)


def ldmatrix_x4(sm, addr, trans=False):
    # addr: per-lane byte address [32]; returns 4 registers, each [32, 2] (lo, hi)
    regs = []
    for m in range(4):
        rows = addr[8 * m:8 * m + 8]  # row addresses of matrix m
        assert np.all(rows % 16 == 0), "ldmatrix rows must be 16-byte aligned"
        mat = np.stack([sm.h[r // 2: r // 2 + 8] for r in rows])  # [8 rows, 8 cols]
        if trans:
            mat = mat.T
        reg = np.stack([mat[G, 2 * Q4], mat[G, 2 * Q4 + 1]], axis=1)
        regs.append(reg)
    return regs


def frag_a(a):
    A = np.zeros((16, 16))
    for L in range(32):
        g, q = L >> 2, L & 3
        A[g, 2 * q:2 * q + 2] = a[0][L]
        A[g + 8, 2 * q:2 * q + 2] = a[1][L]
        A[g, 2 * q + 8:2 * q + 10] = a[2][L]
        A[g + 8, 2 * q + 8:2 * q + 10] = a[3][L]
    return A


def frag_b(b0, b1):
    Bm = np.zeros((16, 8))
    for L in range(32):
        g, q = L >> 2, L & 3
        Bm[2 * q:2 * q + 2, g] = b0[L]
        Bm[2 * q + 8:2 * q + 10, g] = b1[L]
    return Bm


def mma(c, a, b0, b1):
    # c: [32, 4]
    Cm = np.zeros((16, 8))
    for L in range(32):
        g, q = L >> 2, L & 3
        Cm[g, 2 * q:2 * q + 2] = c[L, 0:2]
        Cm[g + 8, 2 * q:2 * q + 2] = c[L, 2:4]
    Dm = frag_a(a) @ frag_b(b0, b1) + Cm
    out = np.zeros_like(c)
    for L in range(32):
        g, q = L >> 2, L & 3
        out[L, 0:2] = Dm[g, 2 * q:2 * q + 2]
        out[L, 2:4] = Dm[g + 8, 2 * q:2 * q + 2]
    assert np.all(np.isfinite(out)), "mma read an unwritten (nan) element"
    return out


def keys_by_queries(sm, a_lane, b_lane, D, BM, LD):
    """bwd_mma_kernel.cuh's keys_by_queries from zero: [BM / 8 n8 tiles, lane, 4] of A B^T."""
    acc = np.zeros((BM // 8, 32, 4))
    for kk in range(D // 16):
        a = ldmatrix_x4(sm, a_lane + kk * 16 * 2)
        for np_ in range(BM // 16):
            bq = ldmatrix_x4(sm, b_lane + (np_ * 16 * LD + kk * 16) * 2)
            acc[2 * np_] = mma(acc[2 * np_], a, bq[0], bq[1])
            acc[2 * np_ + 1] = mma(acc[2 * np_ + 1], a, bq[2], bq[3])
    return acc


def pack2(lo, hi):
    return np.stack([lo, hi], axis=1)


def band_of(tab, dist):
    return sum(dist >= e for e in tab['bands'])


def level_of(tab, j):
    return sum(j < e for e in tab['sink_edges'])


def kernel_block(bx, bh, prm, D, out):
    (q, k, v, dy, ref, Aco, Bco, tab, scale, dq_acc, dk_o, dv_o) = prm
    Bsz, T, Hq, _ = q.shape
    grp = Hq // k.shape[2]
    BN, BM, LD, LDS = 128, 64, D + 8, 64 + 8
    NS, ND, NQ = BM // 8, D // 8, D // 16
    R = tab['R']
    kKV = BN * LD * 2; kQ = BM * LD * 2; kDs = BN * LDS * 2
    sm = Smem(2 * kKV + 4 * kQ + kDs)
    sK = 0; sV = sK + kKV; sQ0 = sV + kKV; sDs = sQ0 + 4 * kQ  # byte addresses
    coef = [np.full(3 * R * BM, np.nan), np.full(3 * R * BM, np.nan)]
    j0 = bx * BN
    b, h = bh // Hq, bh % Hq
    hk = h // grp
    scale_log2 = scale * np.log2(np.e)

    def load_rows(dst, src, row0, rows):
        for r in range(rows):
            val = src[row0 + r] if row0 + r < T else np.zeros(D)
            sm.h[dst // 2 + r * LD: dst // 2 + r * LD + D] = val
            # padding columns stay nan: reading them would poison the result

    j1 = min(j0 + BN, T) - 1
    m_begin = (j0 // BM) * BM
    m_end = T if (tab['has_full'] or j0 < tab['max_sink']) else min(T, j1 + tab['widest'])
    steps = (m_end - m_begin + BM - 1) // BM
    assert steps >= 1

    def issue_step(step):
        m0 = m_begin + step * BM
        sQ = sQ0 + (step & 1) * 2 * kQ
        load_rows(sQ, q[b, :, h], m0, BM)
        load_rows(sQ + kQ, dy[b, :, h], m0, BM)
        cf = coef[step & 1]
        for idx in range(3 * R * BM):
            which, r, tl = idx // (R * BM), (idx // BM) % R, idx % BM
            src = (ref, Aco, Bco)[which]
            cf[idx] = src[b, h, r, m0 + tl] if m0 + tl < T else 0.0

    load_rows(sK, k[b, :, hk], j0, BN)
    load_rows(sV, v[b, :, hk], j0, BN)
    issue_step(0)

    mat_lo = (LANES >> 3) & 1; mat_hi = LANES >> 4; r8 = LANES & 7
    qb_lane = ((8 * mat_hi + r8) * LD + 8 * mat_lo) * 2
    trans_lane = ((8 * mat_lo + r8) * LD + 8 * mat_hi) * 2
    q_base = sQ0
    kStage = 2 * kQ
    state = {}
    for warp in range(8):
        state[warp] = dict(dk=np.zeros((ND, 32, 4)), dv=np.zeros((ND, 32, 4)))

    for step in range(steps):
        m0 = m_begin + step * BM
        # (pending next-stage load: issued after the barrier; in the simulation, loaded at the end of the step
        # into the other stage, which must not disturb this step: assert by loading it now into the other stage)
        if step + 1 < steps:
            issue_step(step + 1)
        q_tile = q_base + (step & 1) * kStage
        dy_tile = q_tile + kQ
        cf = coef[step & 1]
        sRef = cf[0:R * BM]; sA = cf[R * BM:2 * R * BM]; sB = cf[2 * R * BM:]
        # reset dS to nan: every element must be written this step
        sm.h[sDs // 2: sDs // 2 + BN * LDS] = np.nan
        for warp in range(8):
            st = state[warp]
            jw0 = j0 + 16 * warp
            key = [jw0 + G, jw0 + G + 8]
            keys_full = jw0 + 15 < T
            level_lo, level_hi = level_of(tab, jw0), level_of(tab, jw0 + 15)
            k_a = sK + (16 * warp + 8 * mat_lo + r8) * LD * 2 + 8 * mat_hi * 2
            v_a = sV + (16 * warp + 8 * mat_lo + r8) * LD * 2 + 8 * mat_hi * 2
            t_last = min(m0 + BM - 1, T - 1)
            d_min = m0 - (jw0 + 15); d_max = t_last - jw0
            active = jw0 < T and d_max >= 0 and (tab['has_full'] or jw0 < tab['max_sink'] or d_min < tab['widest'])
            uniform_r = -1
            if active and keys_full and m0 + BM <= T and d_min >= 0 and level_lo == level_hi:
                band = band_of(tab, d_min)
                if band == band_of(tab, d_max):
                    uniform_r = band * (len(tab['sink_edges']) + 1) + level_lo
            if uniform_r >= 0 and tab['membership'][uniform_r] == 0:
                active = False
            COUNT[(active, uniform_r >= 0)] = COUNT.get((active, uniform_r >= 0), 0) + 1
            ds_row = [(sDs + (16 * warp + G + 8 * i) * LDS * 2 + 2 * Q4 * 2) for i in range(2)]  # bytes
            if active:
                s = keys_by_queries(sm, k_a, q_tile + qb_lane, D, BM, LD)
                dp = keys_by_queries(sm, v_a, dy_tile + qb_lane, D, BM, LD)
                pa_frag = [[None] * 4 for _ in range(BM // 16)]
                ds_frag = [[None] * 4 for _ in range(BM // 16)]
                for n in range(NS):
                    pa = np.zeros((32, 4)); ds = np.zeros((32, 4))
                    for e in range(4):
                        col = 8 * n + 2 * Q4 + (e & 1)
                        if uniform_r >= 0:
                            rr = np.full(32, uniform_r)
                            valid = np.ones(32, bool)
                        else:
                            t = m0 + col; j = key[e >> 1]
                            valid = (t < T) & (j < T) & (j <= t)
                            rr = np.array([band_of(tab, tt - jj) * (len(tab['sink_edges']) + 1) + level_of(tab, jj)
                                           for tt, jj in zip(t, j)])
                            rr = np.where(valid, rr, 0)
                            valid &= np.array([tab['membership'][x] != 0 for x in rr])
                        refv = sRef[rr * BM + col]; ca = sA[rr * BM + col]; cb = sB[rr * BM + col]
                        prob = np.exp2(s[n][:, e] * scale_log2 - refv)
                        pa[:, e] = np.where(valid, prob * ca, 0.0)
                        ds[:, e] = np.where(valid, prob * (ca * dp[n][:, e] - cb), 0.0)
                    pa_frag[n >> 1][2 * (n & 1)] = pack2(pa[:, 0], pa[:, 1])
                    pa_frag[n >> 1][2 * (n & 1) + 1] = pack2(pa[:, 2], pa[:, 3])
                    ds_frag[n >> 1][2 * (n & 1)] = pack2(ds[:, 0], ds[:, 1])
                    ds_frag[n >> 1][2 * (n & 1) + 1] = pack2(ds[:, 2], ds[:, 3])
                for n in range(NS):
                    for i in range(2):
                        addr = ds_row[i] + 4 * n * 4  # uint32 words: + 4 n words = 16 n bytes
                        val = ds_frag[n >> 1][2 * (n & 1) + i]
                        for L in range(32):
                            sm.h[addr[L] // 2] = val[L, 0]; sm.h[addr[L] // 2 + 1] = val[L, 1]
                for kk in range(BM // 16):
                    for np_ in range(D // 16):
                        bt = ldmatrix_x4(sm, dy_tile + trans_lane + (kk * 16 * LD + np_ * 16) * 2, trans=True)
                        st['dv'][2 * np_] = mma(st['dv'][2 * np_], pa_frag[kk], bt[0], bt[1])
                        st['dv'][2 * np_ + 1] = mma(st['dv'][2 * np_ + 1], pa_frag[kk], bt[2], bt[3])
                for kk in range(BM // 16):
                    for np_ in range(D // 16):
                        bt = ldmatrix_x4(sm, q_tile + trans_lane + (kk * 16 * LD + np_ * 16) * 2, trans=True)
                        st['dk'][2 * np_] = mma(st['dk'][2 * np_], ds_frag[kk], bt[0], bt[1])
                        st['dk'][2 * np_ + 1] = mma(st['dk'][2 * np_ + 1], ds_frag[kk], bt[2], bt[3])
            else:
                for n in range(NS):
                    for i in range(2):
                        addr = ds_row[i] + 4 * n * 4
                        for L in range(32):
                            sm.h[addr[L] // 2] = 0.0; sm.h[addr[L] // 2 + 1] = 0.0
        # barrier; dQ
        for warp in range(8):
            qg, dh = warp & 3, warp >> 2
            ds_a = sDs + ((8 * mat_hi + r8) * LDS + 16 * qg + 8 * mat_lo) * 2
            k_trans = sK + trans_lane + dh * (D // 2) * 2
            if m0 + 16 * qg < T:
                dq = np.zeros((NQ, 32, 4))
                for kk in range(BN // 16):
                    if 16 * kk >= T - j0:
                        break
                    a = ldmatrix_x4(sm, ds_a + kk * 16 * LDS * 2, trans=True)
                    for np_ in range(NQ // 2):
                        bt = ldmatrix_x4(sm, k_trans + (kk * 16 * LD + np_ * 16) * 2, trans=True)
                        dq[2 * np_] = mma(dq[2 * np_], a, bt[0], bt[1])
                        dq[2 * np_ + 1] = mma(dq[2 * np_ + 1], a, bt[2], bt[3])
                for i in range(2):
                    t = m0 + 16 * qg + G + 8 * i
                    for L in range(32):
                        if t[L] >= T:
                            continue
                        for d in range(NQ):
                            col = dh * (D // 2) + 2 * Q4[L] + 8 * d
                            dq_acc[b, t[L], h, col] += dq[d][L, 2 * i] * scale
                            dq_acc[b, t[L], h, col + 1] += dq[d][L, 2 * i + 1] * scale
    for warp in range(8):
        st = state[warp]
        jw0 = j0 + 16 * warp
        for i in range(2):
            key = jw0 + G + 8 * i
            for L in range(32):
                if key[L] >= T:
                    continue
                for d in range(ND):
                    col = 2 * Q4[L] + 8 * d
                    dk_o[b, key[L], h, col:col + 2] = st['dk'][d][L, 2 * i:2 * i + 2] * scale
                    dv_o[b, key[L], h, col:col + 2] = st['dv'][d][L, 2 * i:2 * i + 2]


def run(B, T, Hq, Hkv, D, windows, sinks, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hq, D)); k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D)); dy = rng.standard_normal((B, T, Hq, D))
    w = rng.random((Hq, len(windows))) + 0.1
    scale = D ** -0.5
    order = sorted(range(len(windows)), key=lambda c: (windows[c], sinks[c]))
    windows = [windows[c] for c in order]; sinks = [sinks[c] for c in order]; w = w[:, order]
    tab = host_tables(windows, sinks)
    lse, O = forward_lse_o(q, k, v, windows, sinks, scale)
    ref, A, Bc = prep(tab, lse, O, dy, w)
    dq_acc = np.zeros((B, T, Hq, D)); dk = np.zeros((B, T, Hq, D)); dv = np.zeros((B, T, Hq, D))
    prm = (q, k, v, dy, ref, A, Bc, tab, scale, dq_acc, dk, dv)
    for bh in range(B * Hq):
        for bx in range((T + 127) // 128):
            kernel_block(bx, bh, prm, D, None)
    grp = Hq // Hkv
    dk_o = dk.reshape(B, T, Hkv, grp, D).sum(3); dv_o = dv.reshape(B, T, Hkv, grp, D).sum(3)
    rq, rk, rv = reference(q, k, v, w, windows, sinks, dy, scale)
    errs = [np.abs(a - r).max() / max(np.abs(r).max(), 1.0) for a, r in ((dq_acc, rq), (dk_o, rk), (dv_o, rv))]
    print(f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} windows {windows} sinks {sinks} R{tab['R']}: "
          f"dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e} (active, uniform): {COUNT}", flush=True)
    COUNT.clear()
    assert max(errs) < 1e-10, errs


if __name__ == '__main__':
    F = FULL
    cases = [
        (1, 200, 2, 1, 64, [F, 50, 20, 50], [0, 0, 0, 8]),
        (1, 300, 2, 1, 128, [F, 70, 130], [0, 0, 3]),
        (1, 290, 2, 2, 64, [150, 30], [1, 70]),  # no full: the walk stops early
        (1, 420, 2, 1, 64, [40, 300], [0, 0]),  # no full, no sink: warps skip past the widest window
        (1, 17, 2, 1, 64, [5, F], [1, 0]),
        (1, 1, 2, 1, 128, [1, F], [1, 0]),
        (2, 140, 4, 2, 64, [F, 1, 64, 65, 20, 20, 100, 9], [0, 0, 1, 0, 0, 64, 0, 30]),
    ]
    for case in cases[:1] if '--quick' in sys.argv else cases:
        run(*case)
