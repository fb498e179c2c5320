"""The contract every trunk implements, so stages never need to know which entry they run.

- `forward(ids)` returns float32 logits [B, T, V] (soft-capped where the recipe says so).
- `training_loss(ids, targets, step)` returns the scalar loss that is optimised (mean
  cross-entropy plus any training-only auxiliary terms) and a dict of float diagnostics.
- `param_groups()` routes every parameter, by name, to exactly one optimizer group:
  "embed" (embedding tables, Adam), "head" (untied output head, Adam), "matrix" (2-D block
  matrices, Muon) or "scalar" (vectors, gains and control tensors, Adam).
- `blocks` is the ordered list of transformer blocks (score-first TTT may freeze the first N).
- `causal` is False only for a model built with a known, flagged leak.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import CONTROL_PATTERN, ModelConfig

_CONTROL_RE = re.compile(CONTROL_PATTERN)


def is_control_name(name: str) -> bool:
    """Control tensors: kept fp32, routed to the scalar optimizer group, never quantized."""
    return bool(_CONTROL_RE.search(name))


class LanguageModel(nn.Module):
    """Base class of all trunks. Subclasses set `self.config` and `self.blocks`."""

    config: ModelConfig
    # Parameter names (exact) that are embedding tables trained with the embedding LR.
    embedding_names: tuple[str, ...] = ("tok_emb.weight",)
    head_names: tuple[str, ...] = ("lm_head.weight",)

    @property
    def causal(self) -> bool:
        return True

    def training_loss(self, ids: torch.Tensor, targets: torch.Tensor, step: int = 0):
        logits = self(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, {}

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "embed": [], "head": [], "matrix": [], "scalar": []}
        for name, p in self.named_parameters():
            groups[self.route_param(name, p)].append((name, p))
        return groups

    def route_param(self, name: str, p: nn.Parameter) -> str:
        if name in self.embedding_names:
            return "embed"
        if name in self.head_names:
            return "head"
        if p.ndim == 2 and not is_control_name(name):
            return "matrix"
        return "scalar"

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
