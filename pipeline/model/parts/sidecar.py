"""PR #555 / #684's SharedSparseSidecar: one small module shared by several late layers.

After each site block: x <- x + sigma_site * Sidecar(RMSNorm(x), site), where
  gate = SiLU(W_g x + e_site), val = causal depthwise conv1d_k(W_v x), out = W_p(gate * val).
e_site (`site_gate`, [sites, hidden]) and the per-site output scales sigma ([sites, D]) start at
zero, so the sidecar is a no-op at init. The conv pads only on the left: causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import SidecarConfig


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

    def site_of(self, layer_idx: int) -> int | None:
        return self.layers.index(layer_idx) if layer_idx in self.layers else None

    def forward(self, x_normed: torch.Tensor, site: int) -> torch.Tensor:
        gate = F.silu(self.w_gate(x_normed) + self.site_gate[site].to(x_normed.dtype))
        val = self.w_val(x_normed).transpose(1, 2)  # [B, h, T]
        val = F.conv1d(F.pad(val, (self.kernel - 1, 0)), self.conv.weight.to(val.dtype), groups=val.size(1))
        out = self.w_out(gate * val.transpose(1, 2))
        return self.site_scales[site].to(out.dtype) * out
