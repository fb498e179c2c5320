"""PR #555 / #684's SharedSparseSidecar: one small module shared by several late layers.

After each site block: x <- x + sigma_site * Sidecar(RMSNorm(x), site), where
  gate = SiLU(W_g x + e_site), val = causal depthwise conv1d_k(W_v x), out = W_p(gate * val).
e_site (`site_gate`, [sites, hidden]) and the per-site output scales sigma ([sites, D]) start at
zero, so the sidecar is a no-op at init. The conv pads only on the left: causal.

Settings: `model.sidecar` (SidecarConfig, absent = off), a key of the unet_gpt trunk. Roles:
W_g, W_v, W_p and the per-site gate biases e_site are matrices (Muon), as PR #684 routed them
(its control-name list had `site_scale` but not `site_gate`); the output scales sigma are
control tensors (fp32); the depthwise kernel is `other` (Adam, stored by the size rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import MAX_WIDTH, constrained
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class SidecarConfig:
    """PR #555/#684 SharedSparseSidecar: one small gated causal-conv module shared by sites."""

    hidden: int = constrained(48, ge=1, le=MAX_WIDTH)
    layers: tuple[int, ...] = constrained((8, 9, 10), ge=0, min_len=1, unique=True)
    kernel: int = constrained(3, ge=1, le=4096)


class SharedSparseSidecar(nn.Module):
    def __init__(self, cfg: SidecarConfig, model_dim: int):
        super().__init__()
        h = cfg.hidden
        self.layers = tuple(cfg.layers)
        self.kernel = cfg.kernel
        self.w_gate = nn.Linear(model_dim, h, bias=False)
        self.w_val = nn.Linear(model_dim, h, bias=False)
        self.w_out = nn.Linear(h, model_dim, bias=False)
        self.site_gate = nn.Parameter(torch.zeros(len(self.layers), h))
        self.conv = nn.Conv1d(h, h, cfg.kernel, groups=h, bias=False)
        self.site_scales = nn.Parameter(torch.zeros(len(self.layers), model_dim))
        set_roles(self, matrix=("site_gate",), control=("site_scales",))

    def site_of(self, layer_idx: int) -> int | None:
        return self.layers.index(layer_idx) if layer_idx in self.layers else None

    def forward(self, x_normed: torch.Tensor, site: int) -> torch.Tensor:
        gate = F.silu(self.w_gate(x_normed) + self.site_gate[site].to(x_normed.dtype))
        val = self.w_val(x_normed).transpose(1, 2)  # [B, h, T]
        val = F.conv1d(F.pad(val, (self.kernel - 1, 0)), self.conv.weight.to(val.dtype), groups=val.size(1))
        out = self.w_out(gate * val.transpose(1, 2))
        return self.site_scales[site].to(out.dtype) * out
