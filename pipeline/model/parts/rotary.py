"""Rotary position embedding, full or partial, with the optional NTK base rescale.

Rotate-half convention on the first `dims` channels of each head: pairs (i, i + dims/2).
Partial RoPE (PR #315, used by #684) rotates 16 of 64 dims and leaves the rest position-free.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import RopeConfig


class Rotary(nn.Module):
    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        self.dims = cfg.dims or head_dim
        if self.dims % 2 or self.dims > head_dim:
            raise ValueError(f"rope dims {self.dims} must be even and <= head_dim {head_dim}")
        self.base = cfg.base
        self.ntk_train_seq_len = cfg.ntk_train_seq_len

    def effective_base(self, seq_len: int) -> float:
        # NTK-aware rescale when running longer than the nominal training length. PR #684
        # hard-codes a nominal 1024 while training at 2048, so base' = base * 2^(16/14) there.
        if self.ntk_train_seq_len and seq_len > self.ntk_train_seq_len:
            d = self.dims
            return self.base * (seq_len / self.ntk_train_seq_len) ** (d / (d - 2))
        return self.base

    def cos_sin(self, seq_len: int, device, dtype):
        # Recomputed per call (a [T, dims/2] outer product): no cache means nothing made under
        # inference_mode can leak into autograd (score-first TTT scores, then trains), and no
        # Python-side state for torch.compile to guard on.
        base = self.effective_base(seq_len)
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, Dh] -> same, with the first `dims` channels rotated by position."""
        T = x.size(1)
        cos, sin = self.cos_sin(T, x.device, x.dtype)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half:self.dims], x[..., self.dims:]
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated
