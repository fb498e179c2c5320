"""Attention part `xsa`: the frontier records' attention, causal GQA with exclusive self-attention
and an optional sparse head-output gate.

Per layer, on the already-normalised block input x [B, T, D] (H heads, KV kv-heads, head dim hd):
    q, k, v = x Wq, x Wk, x Wv;  q, k <- RMSNorm per head, RoPE (partial with `model.rope.dims`)
    q <- q * q_gain_h                                  (learned per head, init `model.qk_gain_init`)
    y = causal softmax attention (SDPA, kv-head j serves query heads j*H/KV ... (j+1)*H/KV - 1)
    XSA: y_{t,h} <- y_{t,h} - (y_{t,h} . vhat_t) vhat_t,  vhat_t = v_{t,j(h)} / |v_{t,j(h)}|
    gate: y_{t,h} <- sigmoid(s * W_h . x_t[:w]) * y_{t,h}
    out = y Wo                                          (Wo zero-initialised)

Sources (pg_mechanics.md §4.6; the code read is
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py,
CausalSelfAttention, written here in our own words):
- XSA, exclusive self-attention (arXiv 2603.09078, PR #265; all layers since PR #478): removes from
  each head's output its component along the token's own normalised value, so attention carries
  only what the token does not already hold. The GQA form reshapes y to [B, T, KV, H/KV, hd] and
  broadcasts vhat (no repeat_interleave). It reads v_t only: causal.
- Sparse attention head-output gate (PR #1787, modded-nanogpt style; scale 0.5 in the 1.0611
  record): a per-head sigmoid gate fed by the first `window` = 12 channels of the attention input,
  W [H, window] zero-initialised, so every head starts at half its output (sigmoid(0)); 96
  parameters per layer. It reads x_t only: causal.
- q gain 5.0 (PR #1217/#1413) is `model.qk_gain_init`; partial RoPE 16/64 (PR #315) is
  `model.rope.dims`. The record rotates pairs (i, i + dims/2) by -theta where pgolf's Rotary
  rotates by +theta: a mirror image with the same attention scores up to that reflection, and no
  parameter of it.

Settings (flat keys): `model.xsa_from_layer` (XSA on physical layers >= it; 0 = every layer, the
records' XSA_LAST_N = num_layers), `model.attn_gate` (SparseAttnGateConfig; absent = no gate),
plus `model.qk_gain_init` and `model.rope`. Roles: c_q/c_k/c_v/proj matrices (Muon, the `.attn.`
int6 rule), q_gain control, the gate weight `gate` (fp32 by default; the record stored it int8 per
row, a quant rule on role `gate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MAX_WIDTH, ModelConfig, constrained
from pipeline.model.base import head_dim, rms_norm
from pipeline.model.parts.attention import zero_init
from pipeline.model.parts.rotary import Rotary, rope_problems
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class SparseAttnGateConfig:
    """The sparse head-output gate (PR #1787): sigmoid(scale * W x[:window]) per head."""

    window: int = constrained(12, ge=1, le=MAX_WIDTH)  # leading channels of the attention input read
    scale: float = 1.0  # s; 0.5 in the 1.0611 record (SPARSE_ATTN_GATE_SCALE)
    init_std: float = constrained(0.0, ge=0)  # 0: W starts at zero (the records), else N(0, std^2)


@dataclass(frozen=True)
class XSAAttentionConfig:
    """Recipe keys model.<field> of attention `xsa`."""

    xsa_from_layer: int = constrained(0, ge=0)  # XSA on physical layers >= this (0: all, PR #478 onward)
    attn_gate: Optional[SparseAttnGateConfig] = None  # absent = no head-output gate


settings(XSAAttentionConfig, omit_default=True)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y [B, T, H, hd] less its component along its own kv-head's normalised value v [B, T, KV, hd]."""
    B, T, H, hd = y.shape
    KV = v.size(2)
    yg = y.reshape(B, T, KV, H // KV, hd)  # query head h = j * (H / KV) + g reads kv head j
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, H, hd)


class XSAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, KV = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.H, self.KV, self.hd = H, KV, head_dim(cfg)
        self.c_q = nn.Linear(D, D, bias=False)
        self.c_k = nn.Linear(D, KV * self.hd, bias=False)
        self.c_v = nn.Linear(D, KV * self.hd, bias=False)
        self.proj = zero_init(nn.Linear(D, D, bias=False))
        self.q_gain = nn.Parameter(torch.full((H,), cfg.qk_gain_init))
        self.rotary = Rotary(self.hd, cfg.rope)
        self.xsa = layer_idx >= cfg.xsa_from_layer
        gate = cfg.attn_gate
        self.attn_gate = None
        if gate is not None:
            self.gate_window, self.gate_scale = gate.window, float(gate.scale)
            self.attn_gate = nn.Parameter(torch.zeros(H, gate.window))
            if gate.init_std > 0 and not self.attn_gate.is_meta:
                nn.init.normal_(self.attn_gate, std=gate.init_std)
        set_roles(self, control=("q_gain",), gate=("attn_gate",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.H, self.hd)
        k = self.c_k(x).view(B, T, self.KV, self.hd)
        v = self.c_v(x).view(B, T, self.KV, self.hd)
        q, k = rms_norm(q), rms_norm(k)
        q, k = self.rotary(q), self.rotary(k)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.KV != self.H)
        y = y.transpose(1, 2)  # [B, T, H, hd]
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.attn_gate is not None:
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., :self.gate_window], self.attn_gate.to(x.dtype)))
            y = y * g[..., None]
        return self.proj(y.reshape(B, T, D))


def _xsa_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    out = rope_problems(m, ok)
    if m.attn_gate is not None and ok("model.attn_gate", "model.model_dim") and m.attn_gate.window > m.model_dim:
        out.append((["model.attn_gate.window", "model.model_dim"],
                    f"model.attn_gate.window ({m.attn_gate.window}) reads the first channels of the attention input, "
                    f"which has model_dim = {m.model_dim}; lower the window."))
    return out


@register("attention", "xsa", reads=("qk_gain_init", "rope", "xsa_from_layer", "attn_gate"), check=_xsa_problems)
def xsa_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return XSAAttention(cfg, layer_idx)
