"""ELiTA's Attention2 (attention "elita") and FeedForward2 (mlp "elita_ff2").

Source: seed_components.md §3 (ELiTA, Efficient Linear-Time Attention, A. C. O. Sharma 2023,
github.com/acosharma/elita-transformer, TF2, CC BY-NC-SA). Re-derived from the maths written up
there; no code of the original is used. Switch the parts on in a recipe:

    model: {attention: elita, mlp: elita_ff2, elita: {position_len: 1024, ff_rank: 8}}

Attention2, per head h (§3.1), on the already-normalised block input x:
    kappa_j = k1.x_j + p1(j),  delta_i = k2.x_i,  eta_i = k3.x_i + p2(i),  v_j = x_j V_h
    p(i) = sum_q c_q sin(a_q n_i + b_q)   (p1 uses a1, b1; p2 uses a2, b2; c is shared)
    y_i = (E_i sum_{j<=i} C_j v_j + D_i v_i) / (E_i sum_{j<=i} C_j + D_i),  C, D, E = exp(clip(., +-20))
    out_i = sum_h y_{h,i} O_h
i.e. a row softmax over {j <= i} plus a "self" slot, in linear time via inclusive cumsums. The
query term eta cancels inside the pool: y_i = g_i v_i + (1 - g_i) r_i, where r_i is the C-weighted
prefix mean and g_i = sigmoid(delta_i - eta_i - log Z_i) (tests/test_elita.py checks both forms).

Positions: n_i = i / (position_len - 1), a FIXED scale, so a position's output never depends on
how many tokens follow (prefix consistent; equal to the author's linspace(0, 1, T) when T equals
position_len). `length_normalised_positions: true` restores the published n_i = i / (T - 1),
which `pgolf audit` rejects (prefix_consistency FAILS; no token leaks, §3.2).

Storage choices (parameter counts as the paper's: 3Hd + 5HP + 2Hda per layer):
- k1, k2, k3 are the rows of one [3H, d] linear `c_score`, and V, O are the 2-D linears `c_v`
  [H*a, d] and `proj` [d, H*a] (the H x d x a kernels flattened over heads). As 2-D matrices under
  `.attn.` they get Muon and the int6 export rule like every other attention matrix; 3-D tensors
  would fall to Adam and the generic rules.
- a1, a2, b1, b2, c are `elita_pos_*` [H, P]: control tensors (their declared role), fp32, Adam.
- O (`proj`) and FeedForward2's W3' (`proj`) are zero-initialised like every output projection
  in this codebase, instead of the author's Glorot: each block then starts as the identity on
  the residual stream (the baseline's recipe for stable Muon training), and gradients still reach
  O and W3' at once because their inputs are non-zero. k*, positions: uniform(+-0.05) and V:
  Glorot-uniform with Keras' 3-D fan rule, limit sqrt(6 / (H (d + a))), as the author.

Numerics (§3.2): the attention runs in fp32 (float64 when given float64) with autocast off;
logits are clipped to +-20 before exp, so E_i sum_j C_j <= T e^40 stays finite in fp32 for any
practical T and denominators stay >= e^-20 (the clip also zeroes gradients beyond +-20). There
is deliberately no max-subtraction over the window: exact in exact arithmetic, but it makes the
rounding depend on future tokens, so bitwise causality fails (a test shows it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MAX_WIDTH, ModelConfig, constrained
from pipeline.model.parts.attention import zero_init
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class ElitaConfig:
    """ELiTA Attention2 and FeedForward2 (seed_components.md §3): model.elita.*"""

    position_width: int = constrained(16, ge=1, le=4096)  # P, sinusoid components of the position functions
    value_width: int = constrained(0, ge=0, le=MAX_WIDTH)  # a, per-head value width; 0 = model_dim // num_heads
    # Positions are n_i = i / (position_len - 1) with a FIXED length, so outputs do not depend
    # on how many tokens follow (prefix consistent). The published linspace(0, 1, T) divides by
    # the window's own length instead; it is kept behind this flag and fails `pgolf audit`.
    position_len: int = constrained(1024, ge=2)
    length_normalised_positions: bool = False
    ff_width: int = constrained(0, ge=0, le=MAX_WIDTH)  # A of FeedForward2; 0 = model_dim
    ff_rank: int = constrained(8, ge=1, le=1024)  # r, the author's "linear factor"


settings(ElitaConfig, section="elita")

LOGIT_CLIP = 20.0  # the author's clip: e^20 * T stays far inside fp32's range
_POS_NAMES = ("a1", "a2", "b1", "b2", "c")
_UNIFORM = 0.05  # Keras RandomUniform(-0.05, 0.05), the author's init for k* and positions


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 always, except that a float64 audit run stays float64 (its prefix test needs ~1e-15).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ElitaAttention(nn.Module):
    """Attention2 of seed_components.md §3.1: query-independent pooling with a self slot."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        e, D, H = cfg.elita, cfg.model_dim, cfg.num_heads
        if e.value_width == 0 and D % H:
            raise ValueError(f"elita.value_width=0 means model_dim/num_heads; {D} does not divide by {H}")
        if not e.length_normalised_positions and e.position_len < 2:
            raise ValueError(f"elita.position_len must be >= 2, got {e.position_len}")
        if e.position_width < 1:
            raise ValueError(f"elita.position_width must be >= 1, got {e.position_width}")
        self.H, self.a, self.P = H, e.value_width or D // H, e.position_width
        self.position_len, self.length_normalised = e.position_len, e.length_normalised_positions
        # Rows [0, H) are k1 (key weight), [H, 2H) k2 (self logit), [2H, 3H) k3 (query-side term).
        self.c_score = nn.Linear(D, 3 * H, bias=False)
        nn.init.uniform_(self.c_score.weight, -_UNIFORM, _UNIFORM)
        for name in _POS_NAMES:
            p = nn.Parameter(torch.empty(H, self.P))
            nn.init.uniform_(p, -_UNIFORM, _UNIFORM)
            setattr(self, f"elita_pos_{name}", p)
        set_roles(self, control=tuple(f"elita_pos_{name}" for name in _POS_NAMES))
        self.c_v = nn.Linear(D, H * self.a, bias=False)
        limit = math.sqrt(6.0 / (H * (D + self.a)))  # Keras Glorot on the [H, d, a] kernel
        nn.init.uniform_(self.c_v.weight, -limit, limit)
        self.proj = zero_init(nn.Linear(H * self.a, D, bias=False))

    def positions(self, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """p1, p2 as [T, H]: sinusoid sums of the normalised position n_i."""
        span = T - 1 if self.length_normalised else self.position_len - 1
        n = torch.arange(T, device=device, dtype=dtype) / max(span, 1)
        c = self.elita_pos_c.to(dtype)

        def p(a, b):  # sum_q c_q sin(a_q n_i + b_q), for every head at once
            return (torch.sin(n[:, None, None] * a.to(dtype) + b.to(dtype)) * c).sum(-1)

        return p(self.elita_pos_a1, self.elita_pos_b1), p(self.elita_pos_a2, self.elita_pos_b2)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kappa (key), delta (self), eta (query-side) logits, each [B, T, H], unclipped."""
        B, T, _ = x.shape
        s = F.linear(x, self.c_score.weight.to(x.dtype)).view(B, T, 3, self.H)
        p1, p2 = self.positions(T, x.device, x.dtype)
        return s[:, :, 0] + p1, s[:, :, 1], s[:, :, 2] + p2

    def values(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return F.linear(x, self.c_v.weight.to(x.dtype)).view(B, T, self.H, self.a)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head outputs y [B, T, H, a] before the head mix (x already in the work dtype)."""
        kappa, delta, eta = self.scores(x)
        v = self.values(x)
        C, D, E = (torch.exp(s.clamp(-LOGIT_CLIP, LOGIT_CLIP))[..., None] for s in (kappa, delta, eta))
        # Inclusive prefix sums over j <= i: the only mixing along time, hence causal by construction.
        pooled = torch.cumsum(C * v, dim=1)
        mass = torch.cumsum(C, dim=1)
        return (E * pooled + D * v) / (E * mass + D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = self.heads(x.to(dt))
            out = F.linear(y.flatten(2), self.proj.weight.to(dt))
        return out.to(x.dtype)


class ElitaFeedForward(nn.Module):
    """FeedForward2 of §3.3: y = vec(silu(x W1 + b1) (x) silu(x W2 + b2)) W3' + b3."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, e = cfg.model_dim, cfg.elita
        if e.ff_rank < 1 or e.ff_width < 0:
            raise ValueError(f"elita.ff_rank must be >= 1 and ff_width >= 0, got {e.ff_rank}, {e.ff_width}")
        A, self.r = e.ff_width or D, e.ff_rank
        self.fc_u = nn.Linear(D, A)  # W1, b1
        self.fc_z = nn.Linear(D, self.r)  # W2, b2: the author's "linear factor" r
        for fc in (self.fc_u, self.fc_z):
            # PyTorch-style std 1/sqrt(d) (§3.3) instead of Keras Glorot; biases zero as the author.
            nn.init.normal_(fc.weight, std=D ** -0.5)
            nn.init.zeros_(fc.bias)
        # W3' = W3 reshaped to [(A r), d]; stored as a Linear, so W3[i, j, :] = proj.weight[:, i r + j].
        self.proj = zero_init(nn.Linear(A * self.r, D))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.silu(self.fc_u(x))
        z = F.silu(self.fc_z(x))
        # Outer product, then one matmul: hidden unit (i, j) is silu(.)_i * silu(.)_j.
        return self.proj((u[..., :, None] * z[..., None, :]).flatten(-2))


@register("attention", "elita", reads=("elita",))
def elita_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return ElitaAttention(cfg, layer_idx)


def _ff2_width_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    if not ok("model.elita", "model.model_dim"):
        return []
    width = (m.elita.ff_width or m.model_dim) * m.elita.ff_rank
    if width <= 1 << 20:
        return []
    return [(["model.elita.ff_width", "model.elita.ff_rank", "model.model_dim"],
             f"model.elita: FeedForward2's hidden width (ff_width or model_dim) x ff_rank = {width} is over "
             f"{1 << 20}; lower model.elita.ff_rank or ff_width.")]


@register("mlp", "elita_ff2", reads=("elita",), check=_ff2_width_problems)
def elita_ff2(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return ElitaFeedForward(cfg, layer_idx)
