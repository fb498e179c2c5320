"""Input-side parts of the PR #65 / #684 lineage: BigramHash and the static SmearGate.

BigramHash (seed_prs.md §3.1): bucket_t = ((36313*id_t) XOR (27191*id_{t-1})) mod (B-1) for
t >= 1 and B-1 at t = 0; a zero-initialised B x dim table, a dim -> D projection and a learned
scalar (init 0.05). It reads only the current and previous token, so it is causal.

SmearGate: x_t <- (1 - s) x_t + s x_{t-1} with s = sigmoid(gamma) per channel (gamma init 0,
a 50/50 blend), x_{-1} = 0. Static, not input-dependent, no BOS masking: as #684 did it.

Settings: `model.bigram` (BigramConfig, absent = off) and `model.smear_gate`, both keys of the
unet_gpt trunk (pipeline/model/gpt.py). Roles: the bucket table is an embedding (Adam at
embed_lr), its projection a matrix (Muon), the scalar a control tensor and the smear gate a gate
(both kept fp32 by the default plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import MAX_WIDTH, constrained
from pipeline.model.parts.attention import shift_right
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class BigramConfig:
    """BigramHash embedding (PR #65 lineage; #684 uses 2048 x 96)."""

    buckets: int = constrained(2048, ge=2, le=1 << 20, why="the hash is taken modulo buckets - 1")
    dim: int = constrained(96, ge=1, le=MAX_WIDTH)
    scale_init: float = 0.05


def bigram_buckets(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    cur = ids.long()
    prev = shift_right(cur.unsqueeze(-1)).squeeze(-1)
    h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (buckets - 1)
    h[:, 0] = buckets - 1  # position 0 has no previous token: its own bucket
    return h


class BigramHash(nn.Module):
    def __init__(self, cfg: BigramConfig, model_dim: int):
        super().__init__()
        self.buckets = cfg.buckets
        self.embed = nn.Embedding(cfg.buckets, cfg.dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = nn.Linear(cfg.dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(cfg.scale_init))
        set_roles(self, control=("scale",))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(self.embed(bigram_buckets(ids, self.buckets)))


class SmearGate(nn.Module):
    def __init__(self, model_dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(model_dim))
        set_roles(self, gate=("gate",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.gate).to(x.dtype)
        return (1 - s) * x + s * shift_right(x)
