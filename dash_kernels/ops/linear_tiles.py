"""Tile helpers shared by the linear-attention Triton kernels (gated linear attention, gated delta rule).

Layouts: activations are contiguous ``[B, T, H, D]`` (rows of one head are ``H * D`` apart); states are
``[K, V]`` per (batch, head), processed in value tiles of ``BV`` columns.
"""
import torch
import triton
import triton.language as tl

from ..backends import interpreting


@triton.jit
def row(tile, idx, r):
    """Row r of a [BT, X] register tile (a masked reduction: tiles cannot be indexed by a runtime row)."""
    return tl.sum(tl.where(idx[:, None] == r, tile, 0.0), 0)


@triton.jit
def load_rows(ptr, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, col0=0):
    """Rows [t0, t0 + BT), columns [col0, col0 + BD) of one head of a contiguous [B, T, H, D] tensor, as fp32
    (zeros outside)."""
    rows = t0 + tl.arange(0, BT)
    cols = col0 + tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * H * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, value, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, col0=0):
    rows = t0 + tl.arange(0, BT)
    cols = col0 + tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * H * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_tile(v0, KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile at value column v0 of a row-major [K, V] state."""
    offs_k = tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    return offs_k[:, None] * VD + offs_v[None, :], (offs_k[:, None] < KD) & (offs_v[None, :] < VD)


@triton.jit
def state_block(k0, v0, KD: tl.constexpr, VD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile at (key row k0, value column v0) of a row-major [K, V] state."""
    offs_k = k0 + tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    return offs_k[:, None] * VD + offs_v[None, :], (offs_k[:, None] < KD) & (offs_v[None, :] < VD)


# Triton's CPU interpreter multiplies the bit patterns of bfloat16 dot operands (triton-lang/triton#11584);
# there the operands are rounded to their dtype and multiplied in fp32, which is what the tensor cores compute
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation, for inputs of dtype DT. bf16 inputs: both operands rounded to bf16 (full
    tensor-core rate, half the registers of fp32 tiles; tf32 products ran at half rate), as fla does. fp16 and
    fp32 inputs: fp32 operands (tf32 / exact products): fp16's range (65504) could not hold a state summed
    over thousands of steps."""
    if DT == tl.bfloat16:
        if _INTERPRETING:
            return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(DT), b.to(DT))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


def block(n: int) -> int:
    """The power-of-two tile (at least 16) that covers n."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; 16-bit inputs' fp32 tiles run as tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"
