"""Feed-forward parts. relu2: relu(W1 x)^2 -> W2 with W2 zero-initialised (baseline)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.parts.attention import zero_init
from pipeline.model.registry import register


class ReluSquaredMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = nn.Linear(cfg.model_dim, hidden, bias=False)
        self.proj = zero_init(nn.Linear(hidden, cfg.model_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


@register("mlp", "relu2")
def relu2(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return ReluSquaredMLP(cfg, layer_idx)
