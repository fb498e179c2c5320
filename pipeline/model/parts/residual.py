"""Residual connections: how a sublayer's output y joins the stream x."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.registry import register


class StandardResidual(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


@register("residual", "standard")
def standard(cfg: ModelConfig, layer_idx: int, site: str) -> nn.Module:
    return StandardResidual()
