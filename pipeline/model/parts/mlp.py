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


def _width_problems(m: ModelConfig, ok) -> list[tuple[list[str], str]]:
    if ok("model.mlp_mult", "model.model_dim") and int(m.mlp_mult * m.model_dim) < 1:
        return [(["model.mlp_mult", "model.model_dim"],
                 f"model.mlp_mult: the MLP's hidden width int(mlp_mult x model_dim) = "
                 f"int({m.mlp_mult} x {m.model_dim}) is 0; raise model.mlp_mult.")]
    return []


@register("mlp", "relu2", check=_width_problems)
def relu2(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return ReluSquaredMLP(cfg, layer_idx)
