"""Causal self-attention: the baseline's GQA attention plus PR #684's optional extras.

Baseline (pg_mechanics.md §3.1): separate q/k/v/proj linears without bias, per-head q/k
RMSNorm, RoPE, a learned per-head q gain, causal SDPA with grouped KV heads, zero-init proj.
PR #684 extras, each switched by the recipe (seed_prs.md §3.1):
- kv_shift_mix: k_t += kappa_h k_{t-1}, v_t += nu_h v_{t-1} before norm/RoPE (init 0),
- k_gain: per-KV-head gain on keys after RoPE (init 1),
- local_v_mix: y_h += lambda_h v_t, the token's own value (init 0), XSA's additive twin.
Settings: the flat keys `model.qk_gain_init`, `model.kv_shift_mix`, `model.k_gain`,
`model.local_v_mix` (CausalAttentionConfig) and `model.rope`. Every gain and mix is a control
parameter (Adam, kept fp32 by the default plan); q/k/v/proj are matrices (Muon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.base import head_dim, rms_norm
from pipeline.model.parts.rotary import Rotary, rope_problems
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class CausalAttentionConfig:
    """Recipe keys model.<field>: the baseline's q gain and PR #684's attention extras."""

    qk_gain_init: float = 1.5  # learned per-head q gain, its init (also depth_recurrent's attention)
    kv_shift_mix: bool = False  # k_t += kappa_h k_{t-1}; v_t += nu_h v_{t-1}
    k_gain: bool = False  # per-KV-head gain on keys after RoPE
    local_v_mix: bool = False  # y_h += lambda_h v_t (own value)


settings(CausalAttentionConfig)


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """x[:, t] -> x[:, t-1] along dim 1, with zeros at t = 0 (strictly causal)."""
    return F.pad(x, (0,) * (2 * (x.dim() - 2)) + (1, 0))[:, :-1]


def zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    linear.weight._pgolf_zero_init = True  # orthogonal init must leave it at zero
    return linear


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, KV = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.H, self.KV, self.hd = H, KV, head_dim(cfg)
        self.c_q = nn.Linear(D, D, bias=False)
        self.c_k = nn.Linear(D, KV * self.hd, bias=False)
        self.c_v = nn.Linear(D, KV * self.hd, bias=False)
        self.proj = zero_init(nn.Linear(D, D, bias=False))
        self.q_gain = nn.Parameter(torch.full((H,), cfg.qk_gain_init))
        self.k_gain = nn.Parameter(torch.ones(KV)) if cfg.k_gain else None
        self.k_shift = nn.Parameter(torch.zeros(KV)) if cfg.kv_shift_mix else None
        self.v_shift = nn.Parameter(torch.zeros(KV)) if cfg.kv_shift_mix else None
        self.local_v_mix = nn.Parameter(torch.zeros(H)) if cfg.local_v_mix else None
        set_roles(self, control=("q_gain", "k_gain", "k_shift", "v_shift", "local_v_mix"))
        self.rotary = Rotary(self.hd, cfg.rope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.H, self.hd)
        k = self.c_k(x).view(B, T, self.KV, self.hd)
        v = self.c_v(x).view(B, T, self.KV, self.hd)
        if self.k_shift is not None:
            k = k + self.k_shift.to(k.dtype)[:, None] * shift_right(k)
            v = v + self.v_shift.to(v.dtype)[:, None] * shift_right(v)
        q, k = rms_norm(q), rms_norm(k)
        q, k = self.rotary(q), self.rotary(k)
        q = q * self.q_gain.to(q.dtype)[:, None]
        if self.k_gain is not None:
            k = k * self.k_gain.to(k.dtype)[:, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.KV != self.H)
        y = y.transpose(1, 2)  # [B, T, H, hd]
        if self.local_v_mix is not None:
            own_v = v.repeat_interleave(self.H // self.KV, dim=2)
            y = y + self.local_v_mix.to(y.dtype)[:, None] * own_v
        return self.proj(y.reshape(B, T, D))


@register("attention", "causal", reads=("qk_gain_init", "kv_shift_mix", "k_gain", "local_v_mix", "rope"),
          check=rope_problems)
def causal_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return CausalSelfAttention(cfg, layer_idx)
