"""Rotary position embedding, full or partial, with the optional NTK base rescale.

Rotate-half convention on the first `dims` channels of each head: pairs (i, i + dims/2).
Partial RoPE (PR #315, used by #684) rotates 16 of 64 dims and leaves the rest position-free.
Settings: `model.rope.*` (RopeConfig), read by the parts that rotate (attention `causal`, trunk
`depth_recurrent`), which also run `rope_problems` when a recipe loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ModelConfig, constrained
from pipeline.model.registry import settings


@dataclass(frozen=True)
class RopeConfig:
    base: float = constrained(10000.0, gt=0)
    # Rotary dims per head (0 = the whole head). PR #315's partial RoPE uses 16 of 64.
    dims: int = constrained(0, ge=0)
    # If > 0 and the sequence is longer than this, the base is NTK-rescaled:
    # base * (T / train_seq_len) ** (dims / (dims - 2)). PR #684 hard-codes 1024 while
    # training at 2048, so its rescale is active in training and eval alike.
    ntk_train_seq_len: int = constrained(0, ge=0)


settings(RopeConfig, section="rope")


def rope_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    """Load-time rules of a rotating part: the rotated dims fit the head, and the NTK rescale's
    exponent dims / (dims - 2) exists."""
    d, h, kv = "model.model_dim", "model.num_heads", "model.num_kv_heads"
    if not ok(d, h, kv, "model.rope") or m.model_dim % m.num_heads or m.num_heads % m.num_kv_heads:
        return []  # the head layout's own rule (pipeline.recipe) reports that first
    head_dim = m.model_dim // m.num_heads
    dims = m.rope.dims or head_dim
    if m.rope.dims and (dims % 2 or dims > head_dim):
        return [([d, h, "model.rope.dims"], f"model.rope.dims ({dims}) must be even and at most the head dim "
                                           f"({head_dim} = model_dim / num_heads).")]
    if dims % 2:
        return [([d, h, "model.rope.dims"], f"model: RoPE rotates the whole head unless model.rope.dims says "
                                           f"otherwise, so the head dim model_dim / num_heads = {head_dim} must be "
                                           "even; change model_dim or num_heads, or set an even model.rope.dims.")]
    if m.rope.ntk_train_seq_len and dims < 4:
        return [(["model.rope.ntk_train_seq_len", "model.rope.dims", d, h],
                 f"model.rope.ntk_train_seq_len: the NTK rescale raises the base to dims / (dims - 2), which "
                 f"needs rotary dims >= 4 (got {dims}); set model.rope.ntk_train_seq_len=0 or more dims.")]
    return []


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
