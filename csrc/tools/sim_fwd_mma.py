# Lane-level fp64 numpy simulation of mixed_attention_fwd_mma_kernel (fwd_mma_kernel.cuh): ldmatrix and
# mma.m16n8k16 modelled from the PTX ISA's fragment tables, the kernel's address and index expressions copied, against
# a dense fp64 reference (no 16-bit rounding; warps run one after another, so races are not modelled). Mirror any
# index change of the kernel here. Usage: python csrc/tools/sim_fwd_mma.py (about a minute).
import numpy as np

FULL = 1 << 30
BM, BN = 128, 64
INTERIOR = [0]
L = np.arange(32)
G, QD = L >> 2, L & 3


def ldmatrix_x4(smem, addr_bytes, trans=False):
    addr = addr_bytes // 2  # element index, per lane
    r = np.zeros((32, 4, 2))
    for m in range(4):
        rows = addr[8 * m:8 * m + 8]
        for lane in range(32):
            if not trans:
                base = rows[lane // 4] + 2 * (lane % 4)
                r[lane, m] = smem[base], smem[base + 1]
            else:
                r[lane, m] = smem[rows[2 * (lane % 4)] + lane // 4], smem[rows[2 * (lane % 4) + 1] + lane // 4]
    return r


def mma(c, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for e in range(2):
            A[g, 2 * q + e] = a[lane, 0, e]; A[g + 8, 2 * q + e] = a[lane, 1, e]
            A[g, 2 * q + 8 + e] = a[lane, 2, e]; A[g + 8, 2 * q + 8 + e] = a[lane, 3, e]
            B[2 * q + e, g] = b0[lane, e]; B[2 * q + 8 + e, g] = b1[lane, e]
            C[g, 2 * q + e] = c[lane, e]; C[g + 8, 2 * q + e] = c[lane, 2 + e]
    Dm = A @ B + C
    out = np.zeros((32, 4))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for e in range(2):
            out[lane, e] = Dm[g, 2 * q + e]; out[lane, 2 + e] = Dm[g + 8, 2 * q + e]
    c[:] = out


def quad_red(x, op):
    x = op(x, x[L ^ 1]); return op(x, x[L ^ 2])


def run(q, k, v, w, windows, sinks, scale):
    B_, T, Hq, D = q.shape
    Hkv = k.shape[2]; group = Hq // Hkv; C = len(windows)
    LD = D + 8; NS = BN // 8; ND = D // 8
    KV = BN * LD * 2
    edges = sorted(set(x for x in windows if x < FULL)); has_full = any(x >= FULL for x in windows)
    o = np.full((C, B_, T, Hq, D), np.nan); lse = np.full((B_, Hq, C, T), np.nan); y = np.full((B_, T, Hq, D), np.nan)
    sink_o = np.full((C, B_, T, Hq, D), np.nan); sink_lse = np.full((B_, Hq, C, T), np.nan)
    scale_log2 = scale * np.log2(np.e)
    grid_x = (T + BM - 1) // BM
    for bh in range(B_ * Hq):
        b, h = bh // Hq, bh % Hq; hk = h // group
        for bx in range(grid_x):
            m0 = (grid_x - 1 - bx) * BM
            smem = np.full((BM * LD + 4 * BN * LD), np.nan)
            def load(off, src, row0, rows):
                for r in range(rows):
                    smem[off + r * LD: off + r * LD + D] = src[row0 + r] if row0 + r < T else 0.0
                    smem[off + r * LD + D: off + (r + 1) * LD] = np.nan  # padding never read
            last_row = min(m0 + BM, T) - 1
            widest = edges[-1] if edges else 1
            lowest_key = 0 if has_full else max(0, m0 - widest + 1)
            top, bottom = last_row // BN, lowest_key // BN
            n_walk = top - bottom + 1
            key_tiles = (T + BN - 1) // BN
            sink_tiles = lambda c: min((sinks[c] + BN - 1) // BN, key_tiles)
            total = n_walk + sum(sink_tiles(c) for c in range(C))
            def tile_at(step):
                if step < n_walk: return top - step
                step -= n_walk
                for c in range(C):
                    n = sink_tiles(c)
                    if step < n: return step
                    step -= n
                return 0
            def issue(step):
                j0 = tile_at(step) * BN
                off = BM * LD + (step & 1) * 2 * BN * LD
                load(off, k[b, :, hk], j0, BN); load(off + BN * LD, v[b, :, hk], j0, BN)
            load(0, q[b, :, h], m0, BM)
            issue(0)
            state = {"step": 0}
            def begin_tile():
                st = state["step"]
                # (barrier) then prefetch: the simulation loads the next stage now; the current one is untouched
                if st + 1 < total: issue(st + 1)
                state["step"] = st + 1
                return BM * LD * 2 + (st & 1) * 2 * KV  # bytes
            # per-warp state
            W = []
            for warp in range(8):
                wr0 = m0 + 16 * warp
                t = [wr0 + G, wr0 + G + 8]
                mat_lo, mat_hi, r8 = (L >> 3) & 1, L >> 4, L & 7
                W.append(dict(
                    wr0=wr0, live=wr0 < T, full=wr0 + 15 < T, w_last=min(wr0 + 15, T - 1), t=t,
                    ok=[t[0] < T, t[1] < T], acc=np.zeros((ND, 32, 4)), m=[np.full(32, -np.inf), np.full(32, -np.inf)],
                    l=[np.zeros(32), np.zeros(32)], y=np.zeros((ND, 32, 4)),
                    q_addr=((16 * warp + 8 * mat_lo + r8) * LD + 8 * mat_hi) * 2,
                    k_lane=((8 * mat_hi + r8) * LD + 8 * mat_lo) * 2, v_lane=((8 * mat_lo + r8) * LD + 8 * mat_hi) * 2))
            def scores(ws, k_addr):
                s = np.zeros((NS, 32, 4))
                for kk in range(D // 16):
                    a = ldmatrix_x4(smem, ws["q_addr"] + kk * 16 * 2)
                    for np_ in range(BN // 16):
                        bb = ldmatrix_x4(smem, k_addr + (np_ * 16 * LD + kk * 16) * 2)
                        mma(s[2 * np_], a, bb[:, 0], bb[:, 1]); mma(s[2 * np_ + 1], a, bb[:, 2], bb[:, 3])
                return s
            def step_fn(ws, s, v_addr, key0, masked, include):
                acc, m, l = ws["acc"], ws["m"], ws["l"]
                mx = [np.full(32, -np.inf), np.full(32, -np.inf)]
                for n in range(NS):
                    for e in range(4):
                        i = e >> 1
                        inc = include(i, key0 + 8 * n + (e & 1)) if masked else np.ones(32, bool)
                        mx[i] = np.where(inc, np.maximum(mx[i], s[n, :, e] * scale_log2), mx[i])
                m_new, alpha, empty, sm = [], [], [], [np.zeros(32), np.zeros(32)]
                for i in range(2):
                    mn = np.maximum(m[i], quad_red(mx[i], np.maximum)); m_new.append(mn)
                    emp = mn == -np.inf; empty.append(emp)
                    with np.errstate(invalid="ignore"):
                        alpha.append(np.where(emp, 1.0, np.exp2(m[i] - mn)))
                pa = np.zeros((BN // 16, 32, 4, 2))
                for kk in range(BN // 16):
                    for half in range(2):
                        n = 2 * kk + half
                        pv = np.zeros((4, 32))
                        for e in range(4):
                            i = e >> 1
                            inc = include(i, key0 + 8 * n + (e & 1)) if masked else np.ones(32, bool)
                            with np.errstate(invalid="ignore", over="ignore"):
                                pe = np.where(~empty[i] & inc, np.exp2(s[n, :, e] * scale_log2 - m_new[i]), 0.0)
                            sm[i] = sm[i] + pe; pv[e] = pe
                        pa[kk, :, 2 * half] = np.stack([pv[0], pv[1]], 1)
                        pa[kk, :, 2 * half + 1] = np.stack([pv[2], pv[3]], 1)
                for i in range(2):
                    l[i] = l[i] * alpha[i] + quad_red(sm[i], np.add); m[i] = m_new[i]
                for d in range(ND):
                    acc[d, :, 0] *= alpha[0]; acc[d, :, 1] *= alpha[0]; acc[d, :, 2] *= alpha[1]; acc[d, :, 3] *= alpha[1]
                for kk in range(BN // 16):
                    for np_ in range(D // 16):
                        bb = ldmatrix_x4(smem, v_addr + (kk * 16 * LD + np_ * 16) * 2, trans=True)
                        mma(acc[2 * np_], pa[kk], bb[:, 0], bb[:, 1]); mma(acc[2 * np_ + 1], pa[kk], bb[:, 2], bb[:, 3])
            def out_idx(ws, i, d):  # (row t, column) of this lane's pair
                return ws["t"][i], 8 * d + 2 * QD
            def emit(ws, c, i, value, lse_v, lanes):
                wc = w[h, c]
                for lane in np.nonzero(lanes)[0]:
                    tt = ws["t"][i][lane]
                    for d in range(ND):
                        col = 8 * d + 2 * (lane & 3)
                        ws["y"][d, lane, 2 * i] += wc * value[d][0][lane]; ws["y"][d, lane, 2 * i + 1] += wc * value[d][1][lane]
                        o[c, b, tt, h, col] = value[d][0][lane]; o[c, b, tt, h, col + 1] = value[d][1][lane]
                    if lane & 3 == 0: lse[b, h, c, tt] = lse_v[lane]
            def snapshot(ws, window, j0):
                for i in range(2):
                    lo = np.zeros(32, int) if window >= FULL else np.maximum(0, ws["t"][i] - window + 1)
                    lanes = ws["ok"][i] & (lo >= j0) & (lo < j0 + BN)
                    if not lanes.any(): continue
                    with np.errstate(divide="ignore"):
                        inv_l = 1.0 / ws["l"][i]; lse_v = ws["m"][i] + np.log2(ws["l"][i])
                    value = [[ws["acc"][d, :, 2 * i] * inv_l, ws["acc"][d, :, 2 * i + 1] * inv_l] for d in range(ND)]
                    for c in range(C):
                        if windows[c] != window: continue
                        if sinks[c] > 0:
                            for lane in np.nonzero(lanes)[0]:
                                tt = ws["t"][i][lane]
                                for d in range(ND):
                                    col = 8 * d + 2 * (lane & 3)
                                    sink_o[c, b, tt, h, col] = value[d][0][lane]; sink_o[c, b, tt, h, col + 1] = value[d][1][lane]
                                if lane & 3 == 0: sink_lse[b, h, c, tt] = lse_v[lane]
                        else:
                            emit(ws, c, i, value, lse_v, lanes)
            for kb in range(top, bottom - 1, -1):
                j0 = kb * BN
                k_tile = begin_tile()
                for ws in W:
                    v_addr = k_tile + KV + ws["v_lane"]
                    d_min, d_max = ws["wr0"] - (j0 + BN - 1), ws["w_last"] - j0
                    active = ws["live"] and d_max >= 0 and (has_full or d_min < widest)
                    s = scores(ws, k_tile + ws["k_lane"]) if active else None
                    for band in range(len(edges) + 1):
                        lo = 0 if band == 0 else edges[band - 1]
                        hi = edges[band] if band < len(edges) else FULL
                        if band == len(edges) and not has_full: break
                        if active and d_max >= lo and d_min < hi:
                            key0 = j0 + 2 * QD
                            if d_min >= lo and d_max < hi and j0 + BN <= T and ws["full"]:
                                ws["interior"] = ws.get("interior", 0) + 1
                                step_fn(ws, s, v_addr, key0, False, None)
                            else:
                                def inc(i, j, ws=ws, lo=lo, hi=hi):
                                    dist = ws["t"][i] - j
                                    return ws["ok"][i] & (j < T) & (dist >= lo) & (dist < hi)
                                step_fn(ws, s, v_addr, key0, True, inc)
                        snapshot(ws, hi, j0)
            for c in range(C):
                sink = sinks[c]
                if sink == 0: continue
                window = windows[c]
                for ws in W:
                    ws["limit"] = [np.where(ws["ok"][i], np.minimum(sink, np.maximum(0, ws["t"][i] - window + 1)), 0) for i in range(2)]
                    ws["acc"][:] = 0; ws["m"] = [np.full(32, -np.inf)] * 2; ws["l"] = [np.zeros(32)] * 2
                for kb in range(sink_tiles(c)):
                    j0 = kb * BN
                    k_tile = begin_tile()
                    for ws in W:
                        if ((ws["limit"][0] > j0) | (ws["limit"][1] > j0)).any():
                            s = scores(ws, k_tile + ws["k_lane"])
                            step_fn(ws, s, k_tile + KV + ws["v_lane"], j0 + 2 * QD, True,
                                    lambda i, j, ws=ws: j < ws["limit"][i])
                for ws in W:
                    for i in range(2):
                        lanes = ws["ok"][i]
                        if not lanes.any(): continue
                        tt = np.where(lanes, ws["t"][i], 0)
                        lse_w = sink_lse[b, h, c, tt - (tt & 0) ]  # per lane: its row's (quad) value
                        li, mi = ws["l"][i], ws["m"][i]
                        value = [[None, None] for _ in range(ND)]
                        cols = lambda d: 8 * d + 2 * QD
                        win = [[sink_o[c, b, tt, h, cols(d)], sink_o[c, b, tt, h, cols(d) + 1]] for d in range(ND)]
                        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                            top_m = np.maximum(lse_w, mi)
                            a = np.exp2(lse_w - top_m); bs = np.exp2(mi - top_m)
                            tot = a + li * bs
                            pos = li > 0
                            for d in range(ND):
                                for e in range(2):
                                    value[d][e] = np.where(pos, (win[d][e] * a + ws["acc"][d, :, 2 * i + e] * bs) / tot, win[d][e])
                            lse_v = np.where(pos, top_m + np.log2(tot), lse_w)
                        emit(ws, c, i, value, lse_v, lanes)
            for ws in W:
                for i in range(2):
                    for lane in np.nonzero(ws["ok"][i])[0]:
                        tt = ws["t"][i][lane]
                        for d in range(ND):
                            col = 8 * d + 2 * (lane & 3)
                            y[b, tt, h, col] = ws["y"][d, lane, 2 * i]; y[b, tt, h, col + 1] = ws["y"][d, lane, 2 * i + 1]
            INTERIOR[0] += sum(ws.get("interior", 0) for ws in W)
    return y, o, lse


def reference(q, k, v, w, windows, sinks, scale):
    B_, T, Hq, D = q.shape; group = Hq // k.shape[2]; C = len(windows)
    kk = np.repeat(k, group, axis=2); vv = np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bjhd->bhtj", q, kk) * scale * np.log2(np.e)
    tq = np.arange(T)[:, None]; tj = np.arange(T)[None, :]
    o = np.zeros((C, B_, T, Hq, D)); lse = np.zeros((B_, Hq, C, T))
    for c in range(C):
        mask = (tj <= tq) & ((tq - tj < windows[c]) | (tj < sinks[c]))
        sc = np.where(mask, s, -np.inf)
        mx = sc.max(-1, keepdims=True)
        p = np.exp2(sc - mx); ll = p.sum(-1, keepdims=True)
        lse[:, :, c] = (mx + np.log2(ll))[..., 0]
        o[c] = np.einsum("bhtj,bjhd->bthd", p / ll, vv)
    y = np.einsum("hc,cbthd->bthd", w, o)
    return y, o, lse


if __name__ == "__main__":
    import sys
    rng = np.random.default_rng(0)
    cases = [
        # (B, T, Hq, Hkv, D, windows, sinks)
        (1, 200, 2, 1, 64, [16, 64, 100, FULL], [0, 0, 4, 0]),
        (1, 300, 2, 2, 128, [7, 70, 130, FULL], [0, 0, 70, 0]),
        (2, 140, 4, 2, 64, [1, 33, 33], [0, 0, 3]),
        (1, 64, 2, 1, 64, [FULL], [0]),
        (1, 333, 2, 1, 64, [5, 129, 200], [130, 0, 1]),
    ]
    for (B_, T, Hq, Hkv, D, windows, sinks) in cases:
        q = rng.standard_normal((B_, T, Hq, D)); k = rng.standard_normal((B_, T, Hkv, D)); v = rng.standard_normal((B_, T, Hkv, D))
        w = rng.standard_normal((Hq, len(windows)))
        scale = D ** -0.5
        got = run(q, k, v, w, windows, sinks, scale)
        ref = reference(q, k, v, w, windows, sinks, scale)
        errs = [np.nanmax(np.abs(g - r)) if not np.isnan(g).any() else float("nan") for g, r in zip(got, ref)]
        print((B_, T, Hq, Hkv, D, windows, sinks), "max |err| y, o, lse:", errs, "interior steps", INTERIOR[0], flush=True); INTERIOR[0] = 0
