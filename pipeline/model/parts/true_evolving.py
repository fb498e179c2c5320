"""TrueEvolvingAttention V2 as a drop-in `attention` part, in its parallel (convolution) form.

Source: seed_components.md §1.1 (the HF card `eyad-silx/scaling` states the recurrence; the
rest follows its V1 predecessor in troy12x/QuasarV4). Written here in our own words.

Per head, with l the 0-based layer index, rho = evolution_rate, gamma = memory_decay:
    tau_t  = sin(rho (t+1) (l+1) w)              w = `evolution_weights`, (Dh,) or (H, Dh)
    m_t    = sum_{s<=t} gamma^(t-s) (q_s + tau_s) (the card's loop: m_t = q~_t, m_{-1} = 0)
    q~_t   = q_t + tau_t + gamma m_{t-1}
    k~_t   = k_t + tau_t + 0.5 gamma m_{t-1}
    y      = causal softmax attention of q~, k~ over v (SDPA), heads merged, then W_o.
The card runs the recurrence as a Python loop over t (T sequential steps per layer). Here m is
one causal depthwise convolution along time with the kernel [1, gamma, gamma^2, ...] truncated
at `kernel_taps` (0.85^128 ~ 1e-9), left-padded only, then shifted right by one for m_{t-1}.
The cumsum trick (gamma^t cumsum(gamma^-s u_s)) is avoided: gamma^-T overflows fp32 beyond
T ~ 540. The loop itself lives in tests/test_true_evolving.py only, as the equivalence reference.

Use: `model.attention: true_evolving` with `model.num_kv_heads == model.num_heads`, options under
`model.true_evolving` (TrueEvolvingConfig, declared here). Plain MHA as published: k~ mixes in the *query*
memory of its own head, so grouped KV heads would have to be expanded to H heads before the
attention anyway; GQA is refused rather than silently changed. No RoPE (tau is the position
signal), no dropout (the trunk has none), `model.rope` and `model.qk_gain_init` are unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, constrained
from pipeline.model.base import head_dim
from pipeline.model.parts.attention import shift_right, zero_init
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class TrueEvolvingConfig:
    """TrueEvolvingAttention V2 (seed_components.md §1.1), built in its parallel conv form."""

    evolution_rate: float = 0.1  # rho in tau_t = sin(rho (t+1)(l+1) w)
    memory_decay: float = constrained(0.85, ge=0, lt=1)  # gamma of the memory m_t = sum_s gamma^(t-s) (q_s + tau_s)
    kernel_taps: int = constrained(128, ge=1)  # the gamma^k kernel is truncated here (0.85^128 ~ 1e-9)
    qk_layernorm: bool = False  # V1's per-head LayerNorm on the evolved q and k
    per_head_weights: bool = False  # evolution_weights of shape (H, Dh) instead of (Dh,)
    weights_init_std: float = constrained(0.02, ge=0)


settings(TrueEvolvingConfig, section="true_evolving")


def temporal_signal(T: int, layer_idx: int, rate: float, weights: torch.Tensor) -> torch.Tensor:
    """tau [T, 1 or H, Dh] = sin(rate (t+1) (layer_idx+1) w), in fp32.

    Content-free: an absolute sinusoidal position signal with learned frequencies. Only T x Dh
    (or T x H x Dh) values are formed, never anything T x T."""
    w = weights.float().reshape(-1, weights.size(-1))  # (Dh,) -> (1, Dh); (H, Dh) unchanged
    pos = torch.arange(1, T + 1, device=w.device, dtype=torch.float32) * (rate * (layer_idx + 1))
    return torch.sin(pos[:, None, None] * w)


def decayed_memory(u: torch.Tensor, decay: float, taps: int) -> torch.Tensor:
    """m_t = sum_{j < taps} decay^j u_{t-j} along dim 1 of u [B, T, H, Dh] (causal, exact for T <= taps).

    A depthwise conv1d (groups = channels) with one shared kernel, left padding only, so m_t
    never sees u_{>t}. (Depthwise measured ~2x faster on CPU than one channel of B*H*Dh rows.)"""
    B, T, H, Dh = u.shape
    K, C = min(taps, T), H * Dh  # taps beyond T would only ever multiply the zero padding
    # conv1d correlates: out[t] = sum_i kern[i] u_pad[t + i], so kern[i] = decay^(K-1-i).
    kdtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    kern = decay ** torch.arange(K - 1, -1, -1, device=u.device, dtype=kdtype)
    chans = u.reshape(B, T, C).transpose(1, 2)  # [B, C, T]
    weight = kern.to(u.dtype).view(1, 1, K).expand(C, 1, K).contiguous()  # C x K: small
    m = F.conv1d(F.pad(chans, (K - 1, 0)), weight, groups=C)
    return m.transpose(1, 2).reshape(B, T, H, Dh)


def evolve(q: torch.Tensor, k: torch.Tensor, tau: torch.Tensor, decay: float, taps: int):
    """(q~, k~) of the card's recurrence for q, k [B, T, H, Dh] and tau [T, 1 or H, Dh]."""
    tau = tau.to(q.dtype)
    mem = decay * shift_right(decayed_memory(q + tau, decay, taps))  # gamma m_{t-1}, zero at t = 0
    return q + tau + mem, k + tau + 0.5 * mem


class TrueEvolvingAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, H, te = cfg.model_dim, cfg.num_heads, cfg.true_evolving
        if cfg.num_kv_heads != H:
            raise ValueError(f"attention true_evolving is multi-head only: set model.num_kv_heads = "
                             f"model.num_heads ({H}), got {cfg.num_kv_heads}")
        if te.kernel_taps < 1 or not 0.0 <= te.memory_decay < 1.0:
            raise ValueError("true_evolving needs kernel_taps >= 1 and 0 <= memory_decay < 1, got "
                             f"{te.kernel_taps} and {te.memory_decay}")
        self.H, self.hd, self.layer_idx = H, head_dim(cfg), layer_idx
        self.rate, self.decay, self.taps = te.evolution_rate, te.memory_decay, te.kernel_taps
        # q/k/v keep the trunk's default Linear init like CausalSelfAttention (the card's lineage
        # used N(0, 0.02^2); init="orthogonal" re-initialises them anyway).
        self.c_q = nn.Linear(D, D, bias=False)
        self.c_k = nn.Linear(D, D, bias=False)
        self.c_v = nn.Linear(D, D, bias=False)
        # Zero-initialised output projection, as every output projection in this codebase: each
        # block starts as the identity on the residual stream.
        self.proj = zero_init(nn.Linear(D, D, bias=False))
        # A control tensor: Adam "scalar" group, kept fp32 at export.
        shape = (H, self.hd) if te.per_head_weights else (self.hd,)
        self.evolution_weights = nn.Parameter(torch.randn(shape) * te.weights_init_std)
        set_roles(self, control=("evolution_weights",))
        # V1's per-head LayerNorm(Dh) on the evolved q and k, with its affine weight and bias.
        self.q_norm = nn.LayerNorm(self.hd) if te.qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.hd) if te.qk_layernorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.H, self.hd)
        k = self.c_k(x).view(B, T, self.H, self.hd)
        v = self.c_v(x).view(B, T, self.H, self.hd)
        tau = temporal_signal(T, self.layer_idx, self.rate, self.evolution_weights)
        q, k = evolve(q, k, tau, self.decay, self.taps)
        if self.q_norm is not None:
            # Under autocast LayerNorm returns fp32; SDPA needs q, k, v in one dtype.
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def _mha_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    h, kv = "model.num_heads", "model.num_kv_heads"
    if ok(h, kv) and m.num_kv_heads != m.num_heads:
        return [([h, kv], f"model.attention true_evolving is multi-head only: set model.num_kv_heads = "
                          f"model.num_heads ({m.num_heads}), got {m.num_kv_heads}.")]
    return []


@register("attention", "true_evolving", reads=("true_evolving",), check=_mha_problems)
def true_evolving_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return TrueEvolvingAttention(cfg, layer_idx)
