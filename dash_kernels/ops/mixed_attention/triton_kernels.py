"""Triton kernels for the fused mixed attention (single-pass forward, single-pass backward).

Notation: scores are kept in the log2 domain (``s2 = scale * log2(e) * q.k``), so every
LSE stored here is base 2. Candidates are in the plan's sorted order (by window, full
last); the flat int table ``CAND`` holds, in order: C sorted windows, C sorted sinks,
NB band edges, NS sink edges, the widest window, the largest sink (see spec.py).

Forward, per query tile: for each sorted candidate, walk the key blocks of its *band*
(``W_{c-1} <= t - j < W_c``) into one running online-softmax state; when the band ends,
that state *is* candidate c's softmax over its window: snapshot ``O_c``, ``LSE_c`` and
add ``w_c O_c`` to Y. A sink candidate's sink-only keys (``j < S_c``, ``t - j >= W_c``)
are reduced first into an fp32 scratch and merged into its snapshot by log-sum-exp.
Blocks at a band edge are visited by both bands, each masked to its own part.

Backward: ``dS = exp(s - ref_r) * (A_r * dP - B_r)`` and ``dV += exp(s - ref_r) A_r dY``
with per-row, per-region coefficients from ``_bwd_prep`` (``ref_r`` = smallest LSE of
the region's candidates, so every exponential is <= 1). dK/dV and dQ are computed by
two kernels that each recompute the scores (no atomics).
"""
import triton
import triton.language as tl

FULL = tl.constexpr(1 << 30)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. "upcast" is for Triton's CPU interpreter, which
    mis-multiplies bfloat16 operands (seen with triton 3.9); GPUs never take that branch."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_offsets(T, stride_t, t0, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of rows [t0, t0 + BLOCK_T) of a [T, HEAD_DIM] slab with unit column stride."""
    rows = t0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    return rows[:, None] * stride_t + cols[None, :], (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)


@triton.jit
def _store_tile(base, value, T, stride_t, t0, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    offsets, mask = _tile_offsets(T, stride_t, t0, HEAD_DIM, BLOCK_T, BLOCK_D)
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_tile(base, T, stride_t, t0, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offsets, mask = _tile_offsets(T, stride_t, t0, HEAD_DIM, BLOCK_T, BLOCK_D)
    return tl.load(base + offsets, mask=mask, other=0.0)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, m0, n_lo, n_hi, lo_d, hi_d, key_end, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax steps over key blocks [n_lo, n_hi), keeping ``lo_d <= t - j < hi_d``, ``j < key_end``.

    MASK: 0 = no block needs masking, 1 = every block is masked, 2 = test each block (a branch
    inside the loop; the blocks at the band's two edges are the only ones masked)."""
    m1 = m0 + BLOCK_M
    d_ok = offs_d < HEAD_DIM
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < key_end) & d_ok[:, None], other=0.0)
        s = _mma(q, kt, None, DOT_PRECISION) * qk_scale
        if MASK == 1:
            dist = offs_m[:, None] - offs_n[None, :]
            s = tl.where((dist >= lo_d) & (dist < hi_d) & (offs_n[None, :] < key_end), s, float("-inf"))
        elif MASK == 2:
            if (n0 + BLOCK_N - 1 > m0 - lo_d) | (n0 < m1 - hi_d) | (n0 + BLOCK_N > key_end):
                dist = offs_m[:, None] - offs_n[None, :]
                s = tl.where((dist >= lo_d) & (dist < hi_d) & (offs_n[None, :] < key_end), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=(offs_n[:, None] < key_end) & d_ok[None, :], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_band(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, m0, lo_d, hi_d, key_end, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the keys with ``lo_d <= t - j < hi_d`` and ``j < key_end``.

    SPLIT: the interior blocks (every row inside the band) run in their own unmasked loop and the
    edge blocks in masked loops, instead of one loop testing each block."""
    m1 = m0 + BLOCK_M
    n_start = (tl.maximum(m0 - hi_d + 1, 0) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(m1 - lo_d, key_end)
    if SPLIT:
        # interior block n0: n0 >= m1 - hi_d, n0 + BLOCK_N - 1 <= m0 - lo_d, n0 + BLOCK_N <= key_end
        in_lo = tl.cdiv(tl.maximum(m1 - hi_d, 0), BLOCK_N) * BLOCK_N
        last = tl.minimum(m0 - lo_d - BLOCK_N + 1, key_end - BLOCK_N)
        in_hi = tl.where(last >= 0, (last // BLOCK_N + 1) * BLOCK_N, 0)
        in_lo = tl.minimum(tl.maximum(in_lo, n_start), tl.maximum(n_end, n_start))
        in_hi = tl.minimum(tl.maximum(in_hi, in_lo), tl.maximum(n_end, in_lo))
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    offs_m, offs_d, m0, n_start, in_lo, lo_d, hi_d, key_end, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, 1, DOT_PRECISION)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    offs_m, offs_d, m0, in_lo, in_hi, lo_d, hi_d, key_end, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, 0, DOT_PRECISION)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    offs_m, offs_d, m0, in_hi, n_end, lo_d, hi_d, key_end, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, 1, DOT_PRECISION)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    offs_m, offs_d, m0, n_start, n_end, lo_d, hi_d, key_end, qk_scale,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, 2, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _mixed_attn_fwd(
    Q, K, V, WEIGHTS, CAND, Y, O, LSE, SINK_O, SINK_LSE,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_yb, stride_yt, stride_yh,
    stride_oc, stride_ob, stride_ot, stride_oh,
    T, HQ, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_C: tl.constexpr, HAS_SINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # heaviest (latest) query tiles first: better tail balance under causal masks
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    o_head = b * stride_ob + h * stride_oh
    lse_row = LSE + (bh * NUM_C) * T + offs_m

    # one walk over the key blocks, band by band; after band c the running state covers exactly candidate c's
    # window (a snapshot). Loops, not unrolled: unrolled candidates' live ranges spilled registers.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo_d = 0
    for c in range(NUM_C):
        w_c = tl.load(CAND + c)
        acc, l_i, m_i = _fwd_band(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            offs_m, offs_d, m0, lo_d, w_c, T, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, SPLIT, DOT_PRECISION)
        lo_d = w_c
        l_ref = tl.where(l_i == 0.0, 1.0, l_i)
        o_c = acc / l_ref[:, None]
        lse_c = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_ref))
        sink_c = False
        if HAS_SINK:
            sink_c = (tl.load(CAND + NUM_C + c) > 0) & (w_c < FULL)
        if sink_c:  # the window part waits in fp32 scratch for its sink keys (below)
            _store_tile(SINK_O + c * stride_oc + o_head, o_c, T, stride_ot, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
            tl.store(SINK_LSE + (bh * NUM_C + c) * T + offs_m, lse_c, mask=row_ok)
        else:
            _store_tile(O + c * stride_oc + o_head, o_c, T, stride_ot, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
            tl.store(lse_row + c * T, lse_c, mask=row_ok)
    if HAS_SINK:
        # each sink candidate's sink-only keys (j < S_c, t - j >= W_c), merged with its window part: after the
        # walk, so that no second [BLOCK_M, D] fp32 tile lives beside the walk's accumulator
        tl.debug_barrier()  # the scratch rows below were written by other threads
        for c in range(NUM_C):
            w_c = tl.load(CAND + c)
            s_c = tl.load(CAND + NUM_C + c)
            if (s_c > 0) & (w_c < FULL):
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                acc, l_i, m_i = _fwd_band(
                    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    offs_m, offs_d, m0, w_c, FULL, tl.minimum(s_c, T), qk_scale,
                    HEAD_DIM, BLOCK_M, BLOCK_N, SPLIT, DOT_PRECISION)
                l_ref = tl.where(l_i == 0.0, 1.0, l_i)
                lse_s = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_ref))
                lse_w = tl.load(SINK_LSE + (bh * NUM_C + c) * T + offs_m, mask=row_ok, other=float("-inf"))
                top = tl.maximum(lse_w, lse_s)
                top = tl.where(top == float("-inf"), 0.0, top)
                a_w = tl.math.exp2(lse_w - top)
                a_s = tl.math.exp2(lse_s - top)
                tot = a_w + a_s
                tot_ref = tl.where(tot == 0.0, 1.0, tot)
                o_w = _load_tile(SINK_O + c * stride_oc + o_head, T, stride_ot, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
                o_c = (o_w * a_w[:, None] + (acc / l_ref[:, None]) * a_s[:, None]) / tot_ref[:, None]
                _store_tile(O + c * stride_oc + o_head, o_c, T, stride_ot, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
                tl.store(lse_row + c * T, tl.where(tot == 0.0, float("-inf"), top + tl.math.log2(tot_ref)),
                         mask=row_ok)
    # Y = sum_c w_c O_c, re-read from the O_c just stored (L2-hot): a second fp32 accumulator beside the
    # walk's would spill registers
    tl.debug_barrier()
    y = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in range(NUM_C):
        o_c = _load_tile(O + c * stride_oc + o_head, T, stride_ot, m0, HEAD_DIM, BLOCK_M, BLOCK_D).to(tl.float32)
        y += tl.load(WEIGHTS + h * NUM_C + c) * o_c
    _store_tile(Y + b * stride_yb + h * stride_yh, y, T, stride_yt, m0, HEAD_DIM, BLOCK_M, BLOCK_D)


@triton.jit
def _mixed_attn_bwd_prep(
    DY, O, LSE, WEIGHTS, MEMBERSHIP, DELTA, REF, COEF_A, COEF_B,
    stride_yb, stride_yt, stride_yh,
    stride_oc, stride_ob, stride_ot, stride_oh,
    T, HQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_C: tl.constexpr, NUM_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Per row: D_c = <dY, O_c>; per region r: ref_r = min LSE_c, A_r, B_r (see module doc)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    tile_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dy = tl.load(DY + b * stride_yb + h * stride_yh + offs_m[:, None] * stride_yt + offs_d[None, :],
                 mask=tile_mask, other=0.0).to(tl.float32)
    o_tile = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    row_c = (bh * NUM_C) * T + offs_m
    for c in tl.static_range(NUM_C):
        o = tl.load(o_tile + c * stride_oc, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(DELTA + row_c + c * T, tl.sum(dy * o, 1), mask=row_ok)
    tl.debug_barrier()  # DELTA rows are re-read below by other threads

    row_r = (bh * NUM_R) * T + offs_m
    for r in tl.static_range(NUM_R):
        ref = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        for c in tl.static_range(NUM_C):
            lse = tl.load(LSE + row_c + c * T, mask=row_ok, other=0.0)
            if tl.load(MEMBERSHIP + r * NUM_C + c) != 0:
                ref = tl.minimum(ref, lse)
        coef_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        coef_b = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in tl.static_range(NUM_C):
            if tl.load(MEMBERSHIP + r * NUM_C + c) != 0:
                lse = tl.load(LSE + row_c + c * T, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + row_c + c * T, mask=row_ok, other=0.0)
                term = tl.load(WEIGHTS + h * NUM_C + c) * tl.math.exp2(ref - lse)
                coef_a += term
                coef_b += term * delta
        tl.store(REF + row_r + r * T, ref, mask=row_ok)
        tl.store(COEF_A + row_r + r * T, coef_a, mask=row_ok)
        tl.store(COEF_B + row_r + r * T, coef_b, mask=row_ok)


@triton.jit
def _band_of(dist, CAND, NUM_C: tl.constexpr, NB: tl.constexpr):
    band = dist * 0
    for e in tl.static_range(NB):
        band += (dist >= tl.load(CAND + 2 * NUM_C + e)).to(band.dtype)
    return band


@triton.jit
def _sink_level_of(key, CAND, NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr):
    level = key * 0
    for e in tl.static_range(NS):
        level += (key < tl.load(CAND + 2 * NUM_C + NB + e)).to(level.dtype)
    return level


@triton.jit
def _band_edge(b, CAND, NUM_C: tl.constexpr, NB: tl.constexpr):
    """Smallest distance of band b (b in [0, NB + 1]; band NB + 1 starts at FULL)."""
    edge = 0
    if b > 0:
        if b <= NB:
            edge = tl.load(CAND + 2 * NUM_C + b - 1)
        else:
            edge = FULL
    return edge


# How a backward tile picks each element's region (constexpr MODE of _mix_grad_tile):
INSIDE = tl.constexpr(0)  # the whole tile lies in one region, in bounds and causal
EDGE = tl.constexpr(1)  # non-sink keys, tile within two adjacent bands (narrower than every band)
ANY = tl.constexpr(2)  # anything: each element's band and sink level, then its region's coefficients
# ANY tiles select among up to this many regions, one select per region (the 4-candidate DASH set has 6);
# more regions gather per element
SELECT_REGIONS_UP_TO = tl.constexpr(8)


@triton.jit
def _band_lo_of(d, CAND, NUM_C: tl.constexpr, NB: tl.constexpr):
    """Band of a scalar distance d >= 0."""
    band = 0
    for e in tl.static_range(NB):
        band += (d >= tl.load(CAND + 2 * NUM_C + e)).to(tl.int32)
    return band


@triton.jit
def _next_edge(d, CAND, NUM_C: tl.constexpr, NB: tl.constexpr):
    """Smallest band edge above a scalar distance d (FULL if none); branch-free for loop bodies."""
    edge = FULL + 0
    for i in tl.static_range(NB):
        w = tl.load(CAND + 2 * NUM_C + NB - 1 - i)  # descending
        edge = tl.where(w > d, w, edge)
    return edge


@triton.jit
def _mix_grad_tile(
    s, dp, q_idx, k_idx, ref_row, a_row, b_row, region, d_min, T, CAND,
    NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr, MODE: tl.constexpr,
):
    """Mixed probabilities ``sum_c w_c P_c`` and score gradients ``dS`` for one tile.

    ``q_idx``/``k_idx``: query/key indices broadcastable to ``s`` (either orientation).
    ``*_row``: region 0 of this head's [R, T] coefficient tables. INSIDE tiles use ``region``;
    EDGE tiles (smallest distance ``d_min``) straddle at most one band edge, so each element
    selects between two regions' rows; ANY tiles find each element's region among all R (only where
    needed: key tiles holding sinks, or bands narrower than a tile) and select or gather its row.
    """
    NUM_R: tl.constexpr = (NB + 1) * (NS + 1)
    if MODE == INSIDE:
        ref = tl.load(ref_row + region * T + q_idx)
        coef_a = tl.load(a_row + region * T + q_idx)
        coef_b = tl.load(b_row + region * T + q_idx)
    else:
        q_ok = q_idx < T
        dist = q_idx - k_idx
        valid = (dist >= 0) & q_ok & (k_idx < T)
        if MODE == EDGE:
            near = _band_lo_of(tl.maximum(d_min, 0), CAND, NUM_C, NB)
            far = tl.minimum(near + 1, NB)
            far_edge = _next_edge(tl.maximum(d_min, 0), CAND, NUM_C, NB)
            r_near = near * (NS + 1) * T
            r_far = far * (NS + 1) * T
            is_far = dist >= far_edge
            ref = tl.where(is_far, tl.load(ref_row + r_far + q_idx, mask=q_ok, other=0.0),
                           tl.load(ref_row + r_near + q_idx, mask=q_ok, other=0.0))
            ref = tl.where(valid, ref, float("inf"))  # +inf outside every candidate: p = 0
            coef_a = tl.where(is_far, tl.load(a_row + r_far + q_idx, mask=q_ok, other=0.0),
                              tl.load(a_row + r_near + q_idx, mask=q_ok, other=0.0))
            coef_b = tl.where(is_far, tl.load(b_row + r_far + q_idx, mask=q_ok, other=0.0),
                              tl.load(b_row + r_near + q_idx, mask=q_ok, other=0.0))
        else:
            el_region = _band_of(dist, CAND, NUM_C, NB) * (NS + 1) + _sink_level_of(k_idx, CAND, NUM_C, NB, NS)
            if NUM_R <= SELECT_REGIONS_UP_TO:
                el_region = tl.where(valid, el_region, -1)
                ref = tl.full(s.shape, float("inf"), dtype=tl.float32)
                coef_a = tl.zeros(s.shape, dtype=tl.float32)
                coef_b = tl.zeros(s.shape, dtype=tl.float32)
                for r in tl.static_range(NUM_R):
                    sel = el_region == r
                    ref = tl.where(sel, tl.load(ref_row + r * T + q_idx, mask=q_ok, other=0.0), ref)
                    coef_a = tl.where(sel, tl.load(a_row + r * T + q_idx, mask=q_ok, other=0.0), coef_a)
                    coef_b = tl.where(sel, tl.load(b_row + r * T + q_idx, mask=q_ok, other=0.0), coef_b)
            else:  # one gather per table: the unrolled selects took sm_90 compilation > 15 min at R = 28
                at = el_region * T + q_idx
                ref = tl.load(ref_row + at, mask=valid, other=float("inf"))
                coef_a = tl.load(a_row + at, mask=valid, other=0.0)
                coef_b = tl.load(b_row + at, mask=valid, other=0.0)
    p = tl.math.exp2(s - ref)
    return p * coef_a, p * (coef_a * dp - coef_b)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, dy_base, stride_qt, stride_qd, stride_yt, ref_row, a_row, b_row,
    n0, offs_n, offs_d, m_lo, m_hi, region, T, CAND, qk_scale,
    HEAD_DIM: tl.constexpr, NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < T) & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        dy = tl.load(dy_base + offs_m[:, None] * stride_yt + offs_d[None, :], mask=q_mask, other=0.0)
        s_t = _mma(k, tl.trans(q), None, DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        dp_t = _mma(v, tl.trans(dy), None, DOT_PRECISION)
        p_mix, ds = _mix_grad_tile(s_t, dp_t, offs_m[None, :], offs_n[:, None], ref_row, a_row, b_row,
                                   region, m0 - n0 - BLOCK_N + 1, T, CAND, NUM_C, NB, NS, MODE)
        dv = _mma(p_mix.to(dy.dtype), dy, dv, DOT_PRECISION)
        dk = _mma(ds.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _mixed_attn_bwd_dkdv(
    Q, K, V, DY, REF, COEF_A, COEF_B, CAND, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_yb, stride_yt, stride_yh,
    stride_gb, stride_gt, stride_gh,
    T, HQ, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    # one program per (key tile, query head): a GQA group's heads run in parallel and write
    # per-query-head partial dK/dV that the launcher sums (a loop over the group serialized it)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=key_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # queries that can see these keys: causal, within the widest window, or any later query for sinks
    max_window = tl.load(CAND + 2 * NUM_C + NB + NS)
    max_sink = tl.load(CAND + 2 * NUM_C + NB + NS + 1)
    in_sinks = n0 < max_sink
    q_hi = tl.where(in_sinks, T, tl.minimum(T, n0 + BLOCK_N - 1 + max_window))
    q_lo = (n0 // BLOCK_M) * BLOCK_M
    q_base = Q + b * stride_qb + h * stride_qh
    dy_base = DY + b * stride_yb + h * stride_yh
    row = (b * HQ + h) * (NB + 1) * (NS + 1) * T
    ref_row, a_row, b_row = REF + row, COEF_A + row, COEF_B + row
    # a key tile holding sinks (a few per head): every query tile picks regions per element.
    # Loop bounds rather than branches decide which loops run (no branches around pipelined loops).
    cur = tl.where(in_sinks, q_hi, q_lo)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, dy_base, stride_qt, stride_qd, stride_yt, ref_row, a_row, b_row,
                         n0, offs_n, offs_d, q_lo, cur, 0, T, CAND, qk_scale,
                         HEAD_DIM, NUM_C, NB, NS, BLOCK_M, BLOCK_N, ANY, DOT_PRECISION)
    # other key tiles: query tiles in increasing distance, edge tiles at band edges, runs inside bands
    for band in tl.static_range(NB + 1):
        lo = _band_edge(band, CAND, NUM_C, NB)
        hi = _band_edge(band + 1, CAND, NUM_C, NB)
        # tile m0 is inside band: m0 - (n0 + BLOCK_N - 1) >= lo, m0 + BLOCK_M - 1 - n0 < hi, m0 + BLOCK_M <= T
        run_lo = q_lo + tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + lo - q_lo, 0), BLOCK_M) * BLOCK_M
        last = tl.minimum(tl.minimum(n0 + hi - BLOCK_M, T - BLOCK_M), q_hi - BLOCK_M)
        run_hi = tl.where(last >= q_lo, q_lo + ((last - q_lo) // BLOCK_M + 1) * BLOCK_M, q_lo)
        run_lo = tl.minimum(tl.maximum(run_lo, cur), tl.maximum(run_hi, cur))
        run_hi = tl.maximum(run_hi, run_lo)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, dy_base, stride_qt, stride_qd, stride_yt,
                             ref_row, a_row, b_row, n0, offs_n, offs_d, cur, run_lo, 0, T, CAND, qk_scale,
                             HEAD_DIM, NUM_C, NB, NS, BLOCK_M, BLOCK_N, EDGE_MODE, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, dy_base, stride_qt, stride_qd, stride_yt,
                             ref_row, a_row, b_row, n0, offs_n, offs_d, run_lo, run_hi, band * (NS + 1), T, CAND,
                             qk_scale, HEAD_DIM, NUM_C, NB, NS, BLOCK_M, BLOCK_N, INSIDE, DOT_PRECISION)
        cur = run_hi
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, dy_base, stride_qt, stride_qd, stride_yt,
                         ref_row, a_row, b_row, n0, offs_n, offs_d, cur, q_hi, 0, T, CAND, qk_scale,
                         HEAD_DIM, NUM_C, NB, NS, BLOCK_M, BLOCK_N, EDGE_MODE, DOT_PRECISION)
    grad_head = b * stride_gb + h * stride_gh
    _store_tile(DK + grad_head, dk * sm_scale, T, stride_gt, n0, HEAD_DIM, BLOCK_N, BLOCK_D)
    _store_tile(DV + grad_head, dv, T, stride_gt, n0, HEAD_DIM, BLOCK_N, BLOCK_D)


@triton.jit
def _dq_tiles(
    dq, q, dy, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, ref_row, a_row, b_row,
    m0, offs_m, offs_d, n_lo, n_hi, region, T, CAND, qk_scale,
    HEAD_DIM: tl.constexpr, NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr,
    BLOCK_N: tl.constexpr, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[None, :] < T) & d_ok[:, None]
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=kv_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd, mask=kv_mask, other=0.0)
        s = _mma(q, kt, None, DOT_PRECISION) * qk_scale
        dp = _mma(dy, vt, None, DOT_PRECISION)
        p_mix, ds = _mix_grad_tile(s, dp, offs_m[:, None], offs_n[None, :], ref_row, a_row, b_row,
                                   region, m0 - n0 - BLOCK_N + 1, T, CAND, NUM_C, NB, NS, MODE)
        dq = _mma(ds.to(kt.dtype), tl.trans(kt), dq, DOT_PRECISION)
    return dq


@triton.jit
def _mixed_attn_bwd_dq(
    Q, K, V, DY, REF, COEF_A, COEF_B, CAND, DQ,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_yb, stride_yt, stride_yh,
    stride_gb, stride_gt, stride_gh,
    T, HQ, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_C: tl.constexpr, NB: tl.constexpr, NS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    dy = tl.load(DY + b * stride_yb + h * stride_yh + offs_m[:, None] * stride_yt + offs_d[None, :],
                 mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    row = bh * (NB + 1) * (NS + 1) * T
    ref_row, a_row, b_row = REF + row, COEF_A + row, COEF_B + row
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys: the sink prefix (per-element regions), then the widest window's span, nearest band last
    max_window = tl.load(CAND + 2 * NUM_C + NB + NS)
    max_sink = tl.load(CAND + 2 * NUM_C + NB + NS + 1)
    key_hi = tl.minimum(m0 + BLOCK_M, T)
    win_lo = (tl.maximum(m0 - max_window + 1, 0) // BLOCK_N) * BLOCK_N
    sink_end = tl.minimum(tl.cdiv(max_sink, BLOCK_N) * BLOCK_N, key_hi)
    dq = _dq_tiles(dq, q, dy, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, ref_row, a_row, b_row,
                   m0, offs_m, offs_d, 0, sink_end, 0, T, CAND, qk_scale,
                   HEAD_DIM, NUM_C, NB, NS, BLOCK_N, ANY, DOT_PRECISION)
    cur = tl.maximum(win_lo, sink_end)
    for i in tl.static_range(NB + 1):
        band = NB - i
        lo = _band_edge(band, CAND, NUM_C, NB)
        hi = _band_edge(band + 1, CAND, NUM_C, NB)
        # tile n0 is inside band: m0 + BLOCK_M - 1 - n0 < hi, m0 - (n0 + BLOCK_N - 1) >= lo, n0 + BLOCK_N <= T
        run_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - hi, 0), BLOCK_N) * BLOCK_N
        last = tl.minimum(tl.minimum(m0 - BLOCK_N + 1 - lo, T - BLOCK_N), key_hi - BLOCK_N)
        run_hi = tl.where(last >= 0, (last // BLOCK_N + 1) * BLOCK_N, 0)
        run_lo = tl.minimum(tl.maximum(run_lo, cur), tl.maximum(run_hi, cur))
        run_hi = tl.maximum(run_hi, run_lo)
        dq = _dq_tiles(dq, q, dy, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       ref_row, a_row, b_row, m0, offs_m, offs_d, cur, run_lo, 0, T, CAND, qk_scale,
                       HEAD_DIM, NUM_C, NB, NS, BLOCK_N, EDGE_MODE, DOT_PRECISION)
        dq = _dq_tiles(dq, q, dy, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       ref_row, a_row, b_row, m0, offs_m, offs_d, run_lo, run_hi, band * (NS + 1), T, CAND,
                       qk_scale, HEAD_DIM, NUM_C, NB, NS, BLOCK_N, INSIDE, DOT_PRECISION)
        cur = run_hi
    dq = _dq_tiles(dq, q, dy, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   ref_row, a_row, b_row, m0, offs_m, offs_d, cur, key_hi, 0, T, CAND, qk_scale,
                   HEAD_DIM, NUM_C, NB, NS, BLOCK_N, EDGE_MODE, DOT_PRECISION)
    _store_tile(DQ + b * stride_gb + h * stride_gh, dq * sm_scale, T, stride_gt, m0, HEAD_DIM, BLOCK_M, BLOCK_D)
