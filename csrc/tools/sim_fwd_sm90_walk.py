# Warpgroup-level fp64 numpy simulation of the walk of mixed_attention_fwd_sm90_kernel (fwd_sm90_kernel.cuh), both
# orders: the serial one (sm90tma) and the overlapped one (sm90overlap: runs of plain tiles, each tile's P V issued
# one tile late). It checks the walk's logic, not the CuTe layouts (csrc/tools/check_sm90_layouts.cc does those):
#   - every candidate's O and LSE and Y against a dense fp64 reference, at awkward shapes;
#   - the decisions copied from the kernel (plain_band, the snapshots, the sink pass), so that a snapshot never falls
#     in a tile whose P V is still pending; the lean walk's (sm90lean) run end, computed once, against plain_band at
#     every tile, and its softmax (the raw max scaled once, alpha exactly 1 where the max holds);
#   - the pipeline's bookkeeping: every tile waited for once and released once, in order, and at most 2 stages held
#     by a warpgroup at a time (3 stages: the producer can always load one ahead);
#   - the overlap's register hazards as the kernel orders them: the pending P V reads P and O only after the next
#     softmax has run, and reads the P of its own tile.
# Mirror any change of the kernel's walk here. Usage: python csrc/tools/sim_fwd_sm90_walk.py (a few seconds).
import itertools

import numpy as np

FULL = 1 << 30
BM, BN, WG_ROWS, STAGES = 128, 64, 64, 3


def reference(q, k, v, w, windows, sinks, scale):
    T = q.shape[0]
    s = q @ k.T * scale
    t = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    outs, lses = [], []
    for win, sink in zip(windows, sinks):
        keep = (j <= t) & ((t - j < win) | (j < sink))
        z = np.where(keep, s, -np.inf)
        top = z.max(1, keepdims=True)
        e = np.exp(z - top)
        outs.append(e @ v / e.sum(1, keepdims=True))
        lses.append((top[:, 0] + np.log(e.sum(1))) / np.log(2))
    y = sum(wc * o for wc, o in zip(w, outs))
    return y, outs, lses


def simulate(q, k, v, w, windows, sinks, scale, overlap, lean=False):
    T, D = q.shape
    C = len(windows)
    edges = sorted(set(x for x in windows if x < FULL))
    has_full = any(x >= FULL for x in windows)
    widest = edges[-1] if edges else 1
    scale_log2 = scale / np.log(2)
    o = np.full((C, T, D), np.nan)
    lse = np.full((C, T), np.nan)
    y = np.zeros((T, D))
    sink_o = np.full((C, T, D), np.nan)
    sink_lse = np.full((C, T), np.nan)
    for m0 in range(0, T, BM):
        last_row = min(m0 + BM, T) - 1
        lowest_key = 0 if has_full else max(0, m0 - widest + 1)
        top, bottom = last_row // BN, lowest_key // BN
        sink_tiles = [min((s + BN - 1) // BN, (T + BN - 1) // BN) for s in sinks]
        total = top - bottom + 1 + sum(sink_tiles)
        for wg in range(2):
            wr0 = m0 + WG_ROWS * wg
            wg_live, wg_rows_full = wr0 < T, wr0 + 63 < T
            w_last = min(wr0 + 63, T - 1)
            t = wr0 + np.arange(WG_ROWS)
            row_ok = t < T
            qs = np.zeros((WG_ROWS, D))
            qs[row_ok] = q[t[row_ok]]
            st = {"O": np.zeros((WG_ROWS, D)), "m": np.full(WG_ROWS, -np.inf), "l": np.zeros(WG_ROWS)}
            pipe = {"waited": 0, "released": 0, "pending_tile": None}

            def begin_tile():
                assert pipe["waited"] - pipe["released"] < STAGES - 1 + 1, "more stages held than exist"
                pipe["waited"] += 1
                assert pipe["waited"] - pipe["released"] <= 2, "a warpgroup holds at most 2 stages"
                return pipe["waited"] - 1

            def end_tile():
                pipe["released"] += 1
                assert pipe["released"] <= pipe["waited"]

            def scores(j0):
                keys = j0 + np.arange(BN)
                ks = np.zeros((BN, D))
                ok = keys < T
                ks[ok] = k[keys[ok]]
                return qs @ ks.T, keys

            def values(j0):
                keys = j0 + np.arange(BN)
                vs = np.zeros((BN, D))
                ok = keys < T
                vs[ok] = v[keys[ok]]
                return vs

            def softmax_rows(S, include):
                m = st["m"]
                if lean:  # the raw max, scaled once (scale > 0)
                    mx = np.where(include, S, -np.inf).max(1) * scale_log2
                else:
                    mx = np.where(include, S * scale_log2, -np.inf).max(1)
                m_new = np.maximum(m, mx)
                empty = m_new == -np.inf
                # lean: alpha exactly 1 where the max holds (the kernel's rescale_o then skips the row's multiplies),
                # and no empty-row test around the exponentials: no admitted element may sit in an empty row
                same = empty | (m_new == m) if lean else empty
                assert not lean or not (include & empty[:, None]).any(), "an admitted element in an empty row"
                alpha = np.where(same, 1.0, np.exp2(np.where(same, 0, m - np.where(empty, 0, m_new))))
                pe = np.where(include & ~empty[:, None], np.exp2(S * scale_log2 - np.where(empty, 0, m_new)[:, None]), 0)
                st["l"] = st["l"] * alpha + pe.sum(1)
                st["m"] = m_new
                return pe, alpha

            def band_include(keys, lo, hi):
                dist = t[:, None] - keys[None, :]
                return row_ok[:, None] & (keys[None, :] < T) & (dist >= lo) & (dist < hi)

            def emit(c, rows, value, lse_rows):
                o[c, t[rows]] = value[rows]
                lse[c, t[rows]] = lse_rows[rows]
                y[t[rows]] += w[c] * value[rows]

            def snapshot(window, j0):
                lo = np.zeros(WG_ROWS, dtype=int) if window >= FULL else np.maximum(0, t - window + 1)
                rows = row_ok & (lo >= j0) & (lo < j0 + BN)
                if not rows.any():
                    return False
                assert pipe["pending_tile"] is None, "a snapshot while a P V is pending"
                with np.errstate(divide="ignore", invalid="ignore"):
                    value = st["O"] / st["l"][:, None]
                    lse_rows = st["m"] + np.log2(st["l"])
                for c in range(C):
                    if windows[c] != window:
                        continue
                    if sinks[c] > 0:
                        sink_o[c, t[rows]] = value[rows]
                        sink_lse[c, t[rows]] = lse_rows[rows]
                    else:
                        emit(c, rows, value, lse_rows)
                return True

            dist_min = lambda kb: wr0 - (kb * BN + BN - 1)
            dist_max = lambda kb: w_last - kb * BN
            is_active = lambda kb: wg_live and dist_max(kb) >= 0 and (has_full or dist_min(kb) < widest)

            def plain_band(kb):  # the kernel's plain_band: (plain, lo, hi)
                if not is_active(kb):
                    return False, 0, 0
                j0, d_min, d_max = kb * BN, dist_min(kb), dist_max(kb)
                bands, lo1, hi1, snaps = 0, 0, 0, j0 == 0
                for band in range(len(edges) + 1):
                    lo = 0 if band == 0 else edges[band - 1]
                    hi = edges[band] if band < len(edges) else FULL
                    if band == len(edges) and not has_full:
                        break
                    if d_max >= lo and d_min < hi:
                        bands, lo1, hi1 = bands + 1, lo, hi
                    if band < len(edges):
                        snaps |= wr0 <= j0 + BN + hi - 2 and w_last >= j0 + hi - 1
                return bands == 1 and not snaps, lo1, hi1

            kb = top
            while kb >= bottom:
                j0 = kb * BN
                tile = begin_tile()
                active = is_active(kb)
                plain, lo, hi = plain_band(kb) if overlap else (False, 0, 0)
                if plain:
                    S, keys = scores(j0)
                    P, alpha = softmax_rows(S, band_include(keys, lo, hi))
                    held_v, held_tile = values(j0), tile
                    pipe["pending_tile"] = tile
                    # lean: the run's lowest tile computed once (the lowest above tile 0 whose distances stay below
                    # hi - 1); every tile down to it, and none below it, must be plain in the same band
                    past_hi = w_last - hi + 2
                    run_low = max(bottom, 1, (past_hi + BN - 1) // BN if past_hi > 0 else 0)
                    while kb > run_low if lean else kb > bottom and plain_band(kb - 1)[0]:
                        assert not lean or plain_band(kb - 1) == (True, lo, hi), "a run end past a tile not plain"
                        _, lo, hi = plain_band(kb - 1)
                        kb -= 1
                        j0 = kb * BN
                        nxt = begin_tile()
                        S, keys = scores(j0)  # issued
                        st["O"] *= alpha[:, None]  # the rescale, then the P V issued: O and P read as they are now
                        pv = P @ held_v
                        P_new, alpha = softmax_rows(S, band_include(keys, lo, hi))  # while the P V runs
                        st["O"] += pv  # completed (wait<0>): P may now be overwritten
                        assert pipe["released"] == held_tile, "the pending tile released out of order"
                        end_tile()
                        P, held_v, held_tile = P_new, values(j0), nxt
                        pipe["pending_tile"] = nxt
                    assert not lean or kb == bottom or not plain_band(kb - 1)[0], "a run end above a plain tile"
                    st["O"] = st["O"] * alpha[:, None] + P @ held_v
                    assert pipe["released"] == held_tile
                    end_tile()
                    pipe["pending_tile"] = None
                    kb -= 1
                    continue
                S, keys = scores(j0) if active else (None, None)
                d_min, d_max = dist_min(kb), dist_max(kb)
                for band in range(len(edges) + 1):
                    lo = 0 if band == 0 else edges[band - 1]
                    hi = edges[band] if band < len(edges) else FULL
                    if band == len(edges) and not has_full:
                        break
                    if active and d_max >= lo and d_min < hi:
                        P, alpha = softmax_rows(S, band_include(keys, lo, hi))
                        st["O"] = st["O"] * alpha[:, None] + P @ values(j0)
                    snapshot(hi, j0)
                end_tile()
                kb -= 1
            for c in range(C):
                if sinks[c] == 0:
                    continue
                limit = np.where(row_ok, np.minimum(sinks[c], np.maximum(0, t - windows[c] + 1)), 0)
                wg_limit = min(sinks[c], max(0, w_last - windows[c] + 1)) if wg_live else 0
                st.update(O=np.zeros((WG_ROWS, D)), m=np.full(WG_ROWS, -np.inf), l=np.zeros(WG_ROWS))
                for kb in range(sink_tiles[c]):
                    j0 = kb * BN
                    begin_tile()
                    if wg_limit > j0:
                        S, keys = scores(j0)
                        P, alpha = softmax_rows(S, keys[None, :] < limit[:, None])
                        st["O"] = st["O"] * alpha[:, None] + P @ values(j0)
                    end_tile()
                rows = row_ok
                lw = sink_lse[c, t[rows]]
                wv = sink_o[c, t[rows]]
                m, l, acc = st["m"][rows], st["l"][rows], st["O"][rows]
                has = l > 0
                top_m = np.where(has, np.maximum(lw, np.where(has, m, 0)), lw)
                a = np.exp2(lw - top_m)
                bs = np.where(has, np.exp2(np.where(has, m, 0) - top_m), 0)
                total_w = a + l * bs
                value = np.zeros((WG_ROWS, D))
                value[rows] = (wv * a[:, None] + acc * bs[:, None]) / total_w[:, None]
                lse_rows = np.zeros(WG_ROWS)
                lse_rows[rows] = top_m + np.log2(total_w)
                emit(c, rows, value, lse_rows)
            assert pipe["waited"] == pipe["released"] == total, (pipe, total)
    return y, o, lse


CASES = [  # (T, D, windows, sinks): the GPU tests' sets at one head, and run boundaries
    (8192, 16, [FULL, 2047, 511], [0, 0, 1]),
    (4096, 16, [FULL, 512, 2048, 512], [0, 0, 0, 64]),
    (1000, 16, [FULL, 500, 130, 500], [0, 0, 0, 64]),
    (3001, 16, [777, 100], [1, 64]),
    (257, 16, [300, 1, FULL], [0, 1, 0]),
    (1, 16, [1, FULL], [1, 0]),
    (17, 16, [5, FULL], [1, 0]),
    (2000, 16, [FULL, 1, 64, 65, 300, 300, 2048, 129], [0, 0, 1, 0, 0, 64, 0, 200]),
    (1500, 16, [FULL], [0]),
    (1500, 16, [64, 128], [0, 0]),
]


def main():
    rng = np.random.default_rng(0)
    worst = 0.0
    for (T, D, windows, sinks), (overlap, lean) in itertools.product(CASES, ((False, False), (True, False),
                                                                            (True, True))):
        order = np.argsort(windows, kind="stable")
        windows = [windows[i] for i in order]
        sinks = [sinks[i] for i in order]
        q, k, v = (rng.standard_normal((T, D)) for _ in range(3))
        w = rng.random(len(windows))
        scale = D ** -0.5
        y_ref, o_ref, lse_ref = reference(q, k, v, w, windows, sinks, scale)
        y, o, lse = simulate(q, k, v, w, windows, sinks, scale, overlap, lean)
        err = max(np.abs(y - y_ref).max(), *(np.abs(o[c] - o_ref[c]).max() for c in range(len(windows))),
                  *(np.abs(lse[c] - lse_ref[c]).max() for c in range(len(windows))))
        worst = max(worst, err)
        print(f"T {T:5d} windows {windows} sinks {sinks} overlap {overlap} lean {lean}: max error {err:.2e}")
        assert err < 1e-9, "the walk differs from the reference"
    print(f"walk simulation: every case matches the fp64 reference (worst {worst:.1e})")


if __name__ == "__main__":
    main()
