"""torch.library registration of the kernel backends: custom ops, fake kernels, autograd.

``dash_kernels::mixed_attention_fwd`` returns (Y, O, LSE); O and LSE are the per-candidate
outputs and base-2 log-sum-exps the backward needs. ``backend`` picks the kernels ("triton" or
"cuda": the same O, LSE and gradients contract). ``torch.compile`` sees opaque ops with exact
output shapes (the fake kernels) and an autograd formula.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import triton_op
from .spec import _plan, decode_windows


def _plan_of(windows: List[int], sinks: List[int]):
    return _plan(decode_windows(windows), tuple(int(s) for s in sinks))


@torch.library.custom_op("dash_kernels::mixed_attention_fwd", mutates_args=())
def mixed_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
    windows: List[int], sinks: List[int], scale: float, backend: str = "triton",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        from . import cuda_op

        return cuda_op.mixed_attention_fwd(q, k, v, weights, _plan_of(windows, sinks), scale)
    return triton_op.mixed_attention_fwd(q, k, v, weights, _plan_of(windows, sinks), scale)


@mixed_attention_fwd.register_fake
def _(q, k, v, weights, windows, sinks, scale, backend="triton"):
    batch, seq, heads_q, head_dim = q.shape
    num_c = len(windows)
    return (
        q.new_empty(q.shape),
        q.new_empty(num_c, batch, seq, heads_q, head_dim),
        q.new_empty(batch, heads_q, num_c, seq, dtype=torch.float32),
    )


@torch.library.custom_op("dash_kernels::mixed_attention_bwd", mutates_args=())
def mixed_attention_bwd(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, windows: List[int], sinks: List[int], scale: float,
    backend: str = "triton",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_of(windows, sinks)
    if backend == "cuda":
        from . import cuda_op

        dq, dk, dv, delta = cuda_op.mixed_attention_bwd(dy, q, k, v, weights, o, lse, plan, scale)
    else:
        dq, dk, dv, delta = triton_op.mixed_attention_bwd(dy, q, k, v, weights, o, lse, plan, scale)
    # dw[h, c] = sum_{b, t} <dY, O_c>; back to the caller's candidate order and weight shape
    dw = delta.sum(dim=(0, 3))  # [Hq, C] sorted
    inverse = triton_op.plan_tables(plan, dw.device)["inverse"]
    if inverse is not None:
        dw = dw.index_select(1, inverse)
    if weights.dim() == 1:
        dw = dw.sum(0)
    return dq, dk, dv, dw.to(weights.dtype)


@mixed_attention_bwd.register_fake
def _(dy, q, k, v, weights, o, lse, windows, sinks, scale, backend="triton"):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, weights, windows, sinks, scale, backend = inputs
    _, o, lse = output
    ctx.save_for_backward(q, k, v, weights, o, lse)
    ctx.candidates = (windows, sinks, scale, backend)
    ctx.set_materialize_grads(False)  # O and LSE are internal: no zero-filled gradients for them


def _backward(ctx, dy, _do, _dlse):
    q, k, v, weights, o, lse = ctx.saved_tensors
    if dy is None:  # only O or LSE of the raw op was used: they carry no gradient
        dy = torch.zeros_like(q)
    windows, sinks, scale, backend = ctx.candidates
    dq, dk, dv, dw = mixed_attention_bwd(dy, q, k, v, weights, o, lse, windows, sinks, scale, backend)
    return dq, dk, dv, dw, None, None, None, None


mixed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
