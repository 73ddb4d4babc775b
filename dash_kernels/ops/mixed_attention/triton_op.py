"""Launchers for the Triton kernels: allocation, plan tables, block sizes."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ...backends import interpreting
from .spec import CandidatePlan

MAX_HEAD_DIM = 256  # any head dim up to this (padded to a power of two inside)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # forward: walk each band's interior blocks in an unmasked loop of their own (else one loop that
    # tests each block); backward: tiles at a band edge select between the two regions they straddle
    # (else every masked tile selects among all regions)
    specialize_edges: bool = True


def _gpu_configs(head_dim: int) -> dict:
    # (BLOCK_M queries, BLOCK_N keys, warps, stages): the fastest of benchmarks/tune_configs.py's sweep on
    # an H200 with Triton 3.6 (benchmarks/results/tune_configs_h200_*.json)
    if head_dim <= 64:
        return {
            "fwd": TileConfig(128, 128, 8, 2, specialize_edges=False),
            "dkdv": TileConfig(32, 64, 4, 3),
            "dq": TileConfig(128, 32, 4, 3),
        }
    return {
        "fwd": TileConfig(64, 64, 4, 3, specialize_edges=False),
        "dkdv": TileConfig(32, 128, 8, 2),
        "dq": TileConfig(64, 32, 4, 3),
    }


# Tests and benchmarks may replace entries here (e.g. to exercise uneven tiles).
CONFIG_OVERRIDES: dict = {}

# fp32 operands are twice as wide (and use exact fp32 products): smaller tiles, shallower pipelines.
_FP32_CONFIGS = {
    "fwd": TileConfig(64, 32, 4, 2, specialize_edges=False),
    "dkdv": TileConfig(32, 32, 4, 1),
    "dq": TileConfig(32, 32, 4, 1),
}


def tile_config(kernel: str, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    if kernel in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[kernel]
    if interpreting():
        return TileConfig(16, 16, 1, 1)
    if dtype == torch.float32:
        return _FP32_CONFIGS[kernel]
    return _gpu_configs(head_dim)[kernel]


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # fp32 inputs get fp32 products, not tf32
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"  # see _mma in triton_kernels.py
    return "tf32"  # ignored for 16-bit operands


@functools.lru_cache(maxsize=256)
def plan_tables(plan: CandidatePlan, device: torch.device) -> dict:
    """The plan's device tensors, made once per (plan, device): a copy from a Python list is a
    blocking host-to-device transfer, and one per call per layer stalled the whole model."""
    identity = plan.order == tuple(range(plan.num_candidates))
    inverse = sorted(range(plan.num_candidates), key=lambda i: plan.order[i])
    return {
        "cand": torch.tensor(plan.table(), dtype=torch.int32, device=device),
        "membership": torch.tensor(plan.membership, dtype=torch.int32, device=device).flatten(),
        # sorted position i holds user candidate order[i]; user candidate c sits at inverse[c]
        "order": None if identity else torch.tensor(plan.order, dtype=torch.long, device=device),
        "inverse": None if identity else torch.tensor(inverse, dtype=torch.long, device=device),
    }


def sorted_tables(plan: CandidatePlan, weights: torch.Tensor, heads_q: int, device):
    """Sorted per-head weights [Hq, C] fp32, the int table, and the region membership (every backend's launcher
    takes the weights in this form)."""
    tables = plan_tables(plan, torch.device(device))
    w = weights.detach().to(device=device, dtype=torch.float32)
    w = w.expand(heads_q, -1) if w.dim() == 1 else w
    if tables["order"] is not None:
        w = w.index_select(1, tables["order"])
    return w.contiguous(), tables["cand"], tables["membership"]


def mixed_attention_fwd(q, k, v, weights, plan: CandidatePlan, scale: float):
    """Returns (Y, O [C, B, T, Hq, D] in q.dtype, LSE [B, Hq, C, T] base-2 fp32), sorted order."""
    from . import triton_kernels as kern

    batch, seq, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    num_c = plan.num_candidates
    has_sink = plan.max_sink > 0
    w, cand, _ = sorted_tables(plan, weights, heads_q, q.device)
    y = torch.empty(batch, seq, heads_q, head_dim, device=q.device, dtype=q.dtype)
    o = torch.empty(num_c, batch, seq, heads_q, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads_q, num_c, seq, device=q.device, dtype=torch.float32)
    if has_sink:
        sink_o = torch.empty(o.shape, device=q.device, dtype=torch.float32)
        sink_lse = torch.empty_like(lse)
    else:
        sink_o, sink_lse = o, lse  # never touched
    cfg = tile_config("fwd", head_dim, q.dtype)
    grid = (triton_cdiv(seq, cfg.block_m), batch * heads_q)
    kern._mixed_attn_fwd[grid](
        q, k, v, w, cand, y, o, lse, sink_o, sink_lse,
        *q.stride(), *k.stride(), *v.stride(),
        *y.stride()[:3], *o.stride()[:4],
        seq, heads_q, heads_q // heads_kv, scale * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_C=num_c, HAS_SINK=has_sink,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.specialize_edges, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, o, lse


def mixed_attention_bwd(dy, q, k, v, weights, o, lse, plan: CandidatePlan, scale: float):
    """Returns (dq, dk, dv, delta [B, Hq, C, T]) with delta_c = <dY, O_c> in sorted order."""
    from . import triton_kernels as kern

    batch, seq, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    num_c, num_r = plan.num_candidates, plan.num_regions
    nb, ns = len(plan.band_edges), len(plan.sink_edges)
    w, cand, membership = sorted_tables(plan, weights, heads_q, q.device)
    dy = dy.contiguous()
    block_d = _block_d(head_dim)
    delta = torch.empty(batch, heads_q, num_c, seq, device=q.device, dtype=torch.float32)
    ref, coef_a, coef_b = (
        torch.empty(batch, heads_q, num_r, seq, device=q.device, dtype=torch.float32) for _ in range(3)
    )
    prep_m = 16 if interpreting() else 64
    kern._mixed_attn_bwd_prep[(triton_cdiv(seq, prep_m), batch * heads_q)](
        dy, o, lse, w, membership, delta, ref, coef_a, coef_b,
        *dy.stride()[:3], *o.stride()[:4], seq, heads_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_C=num_c, NUM_R=num_r, BLOCK_M=prep_m,
        num_warps=4,
    )
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    group = heads_q // heads_kv
    # dK/dV per query head (fp32 when a GQA group sums them below)
    part_dtype = k.dtype if group == 1 else torch.float32
    dk = torch.empty(batch, seq, heads_q, head_dim, device=q.device, dtype=part_dtype)
    dv = torch.empty(batch, seq, heads_q, head_dim, device=q.device, dtype=part_dtype)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_C=num_c, NB=nb, NS=ns,
                  DOT_PRECISION=_dot_precision(q.dtype))
    qk_scale = scale * math.log2(math.e)
    cfg = tile_config("dkdv", head_dim, q.dtype)
    kern._mixed_attn_bwd_dkdv[(triton_cdiv(seq, cfg.block_n), batch * heads_q)](
        q, k, v, dy, ref, coef_a, coef_b, cand, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dy.stride()[:3], *dk.stride()[:3],
        seq, heads_q, heads_q // heads_kv, qk_scale, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EDGE_MODE=_edge_mode(plan, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    cfg = tile_config("dq", head_dim, q.dtype)
    kern._mixed_attn_bwd_dq[(triton_cdiv(seq, cfg.block_m), batch * heads_q)](
        q, k, v, dy, ref, coef_a, coef_b, cand, dq,
        *q.stride(), *k.stride(), *v.stride(), *dy.stride()[:3], *dq.stride()[:3],
        seq, heads_q, heads_q // heads_kv, qk_scale, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EDGE_MODE=_edge_mode(plan, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    if group > 1:
        dk = dk.view(batch, seq, heads_kv, group, head_dim).sum(3).to(k.dtype)
        dv = dv.view(batch, seq, heads_kv, group, head_dim).sum(3).to(v.dtype)
    return dq, dk, dv, delta


def _edge_mode(plan: CandidatePlan, cfg: TileConfig) -> int:
    """EDGE (1) when no tile can span more than one band edge, else ANY (2); see _mix_grad_tile."""
    edges = (0, *plan.band_edges)
    narrowest = min((b - a for a, b in zip(edges, edges[1:])), default=1 << 30)
    return 1 if cfg.specialize_edges and narrowest >= cfg.block_m + cfg.block_n - 1 else 2


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())
