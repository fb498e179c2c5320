"""Feed-forward part `leaky_relu2`: leaky_relu(W1 x, slope)^2 -> W2, W2 zero-initialised.

PR #493 (first merged in records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon,
pg_mechanics.md §4.6) replaced the baseline's relu(x)^2 by leaky_relu(x, 0.5)^2 and measured
-0.002 to -0.003 bpb; every later record keeps it, the 1.0611 record at MLP 4x (hidden 2048).
Negative pre-activations then still pass a gradient (slope^2 |x|^2 is not flat), where relu^2
drops them. Same weights and names as `relu2` (fc, proj), so the quant rules and the parameter
count are those of the baseline MLP.

Setting: `model.mlp_leaky_slope` (default 0.5, the records' value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, constrained
from pipeline.model.parts.mlp import ReluSquaredMLP, _width_problems
from pipeline.model.registry import register, settings


@dataclass(frozen=True)
class LeakyMLPConfig:
    """Recipe key model.mlp_leaky_slope of the `leaky_relu2` MLP."""

    mlp_leaky_slope: float = constrained(0.5, ge=0, le=1)  # PR #493's 0.5; 0 is relu^2


settings(LeakyMLPConfig, omit_default=True)


class LeakyReluSquaredMLP(ReluSquaredMLP):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.slope = float(cfg.mlp_leaky_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=self.slope).square())


@register("mlp", "leaky_relu2", reads=("mlp_leaky_slope",), check=_width_problems)
def leaky_relu2(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return LeakyReluSquaredMLP(cfg, layer_idx)
