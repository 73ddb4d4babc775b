"""Teacher-aligned linear candidates on the teacher layer's own q/k/v: gated linear attention ("gla") and
the gated delta rule ("gdn").

GLA (``LinearAttention``): the candidate reads the teacher's projected (and rotated) queries, keys and values, the same ones the
softmax candidates see, and adds small parameters of its own, trained in stage 1 (``dash align``) to
reproduce the teacher layer's attention output:
- per-head feature maps ``phi(x) = elu(x W_h) + 1`` on queries and keys (``W_h`` starts at identity);
- a per-channel forget gate from the layer input, ``g = logsigmoid(x A B + c) / 16`` (low rank, starting
  close to no decay);
- normalisation: values carry a column of ones, so the output is ``num / den`` like softmax attention.
It runs through ``dash_kernels.gated_linear_attention``. Its output goes through the teacher's o_proj,
like every other candidate's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dash_kernels import gated_delta_rule, gated_linear_attention

GATE_RANK = 16
GATE_NORMALIZER = 16.0


class LinearAttention(nn.Module):
    def __init__(self, hidden_size: int, heads_q: int, heads_kv: int, head_dim: int):
        super().__init__()
        self.heads_q, self.heads_kv, self.head_dim = heads_q, heads_kv, head_dim
        eye = torch.eye(head_dim).expand(heads_q, head_dim, head_dim).clone()
        self.q_map = nn.Parameter(eye.clone())
        self.k_map = nn.Parameter(eye.clone())
        self.gate_down = nn.Parameter(torch.randn(hidden_size, GATE_RANK) / hidden_size ** 0.5)
        self.gate_up = nn.Parameter(torch.zeros(GATE_RANK, heads_q * head_dim))
        self.gate_bias = nn.Parameter(torch.full((heads_q * head_dim,), 4.0))  # logsigmoid(4)/16: ~no decay

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D], hidden [B, T, hidden] -> [B, T, Hq, D] in q's dtype."""
        group = self.heads_q // self.heads_kv
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        dtype = q.dtype
        q_feat = F.elu(torch.einsum("bthd,hde->bthe", q.float(), self.q_map)) + 1
        k_feat = F.elu(torch.einsum("bthd,hde->bthe", k.float(), self.k_map)) + 1
        gate = (hidden.float() @ self.gate_down) @ self.gate_up + self.gate_bias
        g = F.logsigmoid(gate).view(*q.shape[:2], self.heads_q, self.head_dim) / GATE_NORMALIZER
        ones = torch.ones(*v.shape[:3], 1, device=v.device, dtype=dtype)
        # q/k/v in the model's dtype (16-bit operands for the kernels' products), gates and state in fp32
        out, _ = gated_linear_attention(q_feat.to(dtype), k_feat.to(dtype), torch.cat([v, ones], -1), g, scale=1.0,
                                        check_decay=False)  # logsigmoid: <= 0 by construction
        out = out.float()
        return (out[..., :-1] / out[..., -1:].clamp_min(1e-6)).to(dtype)


class GatedDeltaAttention(nn.Module):
    """Gated delta rule (Gated DeltaNet's recurrence) on the teacher's rotated q/k and its v.

    - per-head linear maps on queries and keys (start at identity), then L2 normalisation (the delta
      rule needs unit keys; unit queries read the memory at the same scale);
    - a per-head forget gate ``g = logsigmoid(x a + c) / 16`` and write strength ``beta = sigmoid(x b + d)``
      from the layer input (start near no decay and beta = 0.5);
    - a per-head output gain (starts at 1): a unit query reads back values at their stored scale.
    It runs through ``dash_kernels.gated_delta_rule``.
    """

    def __init__(self, hidden_size: int, heads_q: int, heads_kv: int, head_dim: int):
        super().__init__()
        self.heads_q, self.heads_kv, self.head_dim = heads_q, heads_kv, head_dim
        eye = torch.eye(head_dim).expand(heads_q, head_dim, head_dim).clone()
        self.q_map = nn.Parameter(eye.clone())
        self.k_map = nn.Parameter(eye.clone())
        self.gate = nn.Parameter(torch.zeros(hidden_size, heads_q))
        self.gate_bias = nn.Parameter(torch.full((heads_q,), 4.0))
        self.write = nn.Parameter(torch.zeros(hidden_size, heads_q))
        self.write_bias = nn.Parameter(torch.zeros(heads_q))
        self.gain = nn.Parameter(torch.ones(heads_q))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D], hidden [B, T, hidden] -> [B, T, Hq, D] in q's dtype."""
        group = self.heads_q // self.heads_kv
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        dtype = q.dtype
        q_feat = F.normalize(torch.einsum("bthd,hde->bthe", q.float(), self.q_map), dim=-1)
        k_feat = F.normalize(torch.einsum("bthd,hde->bthe", k.float(), self.k_map), dim=-1)
        x = hidden.float()
        g = F.logsigmoid(x @ self.gate + self.gate_bias) / GATE_NORMALIZER  # [B, T, Hq]
        beta = torch.sigmoid(x @ self.write + self.write_bias)
        out, _ = gated_delta_rule(q_feat.to(dtype), k_feat.to(dtype), v, g, beta, scale=1.0, check_decay=False)
        return (out.float() * self.gain[:, None]).to(dtype)


LINEAR_MODULES = {"gla": LinearAttention, "gdn": GatedDeltaAttention}


def make_linear(kind: str, hidden_size: int, heads_q: int, heads_kv: int, head_dim: int) -> nn.Module:
    """The teacher-aligned module of a linear candidate kind."""
    if kind not in LINEAR_MODULES:
        raise ValueError(f"unknown linear candidate kind {kind!r}; known: {sorted(LINEAR_MODULES)}")
    return LINEAR_MODULES[kind](hidden_size, heads_q, heads_kv, head_dim)
