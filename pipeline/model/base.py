"""The contract every trunk implements, so stages never need to know which entry they run.

- `forward(ids)` returns float32 logits [B, T, V] (soft-capped where the recipe says so).
- `training_loss(ids, targets, step)` returns the scalar loss that is optimised (mean
  cross-entropy plus any training-only auxiliary terms) and a dict of float diagnostics;
  `plan_training(max_steps)` is called once before it (a no-op unless the trunk schedules).
- `param_groups()` routes every parameter, by the role its part declared where it created it
  (pipeline.model.roles), to exactly one optimizer group: "embed" (embedding tables, Adam),
  "head" (untied output head, Adam), "matrix" (2-D block matrices, Muon) or "scalar" (vectors,
  gains, gates and control tensors, Adam).
- `blocks` is the ordered list of transformer blocks (score-first TTT may freeze the first N).
- `causal` is False only for a model built with a known, flagged leak.

Also the settings both trunks read, `model.unet_skips` and `model.resid_mix` (TrunkConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.registry import settings
from pipeline.model.roles import ROUTE, param_roles, route_groups


@dataclass(frozen=True)
class TrunkConfig:
    """Recipe keys model.<field> of both trunks."""

    # U-Net skips: the first half of the blocks feed the last ones, LIFO.
    unet_skips: bool = True
    # resid_mix: x <- m0*x + m1*x0 per block, init (1, 0) (baseline).
    resid_mix: bool = True


settings(TrunkConfig)


class LanguageModel(nn.Module):
    """Base class of all trunks. Subclasses set `self.config` and `self.blocks`."""

    config: ModelConfig

    @property
    def causal(self) -> bool:
        return True

    def plan_training(self, max_steps: int) -> None:
        """Told once by the trainer (and the memory preflight) before `training_loss`: the number of
        optimizer steps planned. A trunk whose training forward changes with the step (looped
        layers switched on at a fraction of training, pipeline/model/looped.py) schedules from it."""

    def training_loss(self, ids: torch.Tensor, targets: torch.Tensor, step: int = 0):
        logits = self(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, {}

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return route_groups(self)

    def route_param(self, name: str, p: nn.Parameter) -> str:
        return ROUTE[param_roles(self)[name]]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(z / cap): bounds logits smoothly (baseline, all records)."""
    if cap <= 0:
        return logits
    return cap * torch.tanh(logits / cap)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (no learned gain anywhere, as the baseline)."""
    return F.rms_norm(x, (x.size(-1),))


def head_dim(cfg: ModelConfig) -> int:
    """model_dim // num_heads, after checking the head layout every attention part relies on."""
    D, H, KV = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
    if D % H or H % KV:
        raise ValueError(f"model_dim {D} must divide by num_heads {H}, and heads by kv heads {KV}")
    return D // H
