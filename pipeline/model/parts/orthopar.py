"""Orthogonal-Parallel residuals: lof310's replacement of x + y (seed_components.md §2.1).

Source: lof310/projects, `components/Benchmark_Residual_Stream.ipynb` (read at 187be58); the
maths below is restated in our words. Per token, with reductions over the channel dim only:

    c    = <x, y> / max(<x, x>, eps)          y's coefficient along x
    orth = alpha * (y - c x)                   y's part orthogonal to x, gated per channel
    par  = beta * (c y / s), s = sum_i y_i     "orthopar": the published term (a rescaled y)
    par  = beta * (c x)                        "orthopar_fixed": the true parallel part
    x_new = x + orth + par

alpha, beta in R^d are learned per layer and per site (attn / mlp), drawn at init from
N(alpha_mean, alpha_std^2) and N(beta_mean, beta_std^2) (`cfg.orthopar`; the author's
0.25 +- 0.5 and 0.15 +- 0.25, so some channels start negative). The fixed variant is
x + alpha y + (beta - alpha) (c x): a per-channel gain on y plus a learned per-channel
rescaling of x along itself, with no division by a signed sum.

s is a plain signed sum (the notebook calls it `norm_y`) and is often near 0, so the faithful
variant guards it as s + sign(s) * sum_eps with sign(0) taken as +; it can still spike, which
is the point of offering the fixed variant. Everything is per token, hence causal.

Use: `model.residual: orthopar` (or `orthopar_fixed`); the trunk calls module(x, y) with y
already scaled by attn_scale / mlp_scale. `ortho_alpha` / `ortho_beta` are control tensors
(fp32 at export, Adam scalar group). Settings: `model.orthopar.*` (OrthoParConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ModelConfig, constrained
from pipeline.model.registry import register, settings
from pipeline.model.roles import set_roles


@dataclass(frozen=True)
class OrthoParConfig:
    """lof310's Orthogonal-Parallel residual (seed_components.md §2.1): model.orthopar.*"""

    alpha_mean: float = 0.25
    alpha_std: float = constrained(0.5, ge=0)
    beta_mean: float = 0.15
    beta_std: float = constrained(0.25, ge=0)
    eps: float = constrained(1e-8, gt=0)  # floor of <x, x> in the projection coefficient
    sum_eps: float = constrained(1e-6, gt=0)  # guard of the faithful variant's 1/sum(y): s + sign(s) * sum_eps


settings(OrthoParConfig, section="orthopar")


class OrthoParResidual(nn.Module):
    def __init__(self, cfg: ModelConfig, fixed: bool):
        super().__init__()
        oc, D = cfg.orthopar, cfg.model_dim
        self.fixed = fixed
        self.eps, self.sum_eps = oc.eps, oc.sum_eps
        self.ortho_alpha = nn.Parameter(torch.empty(D))
        self.ortho_beta = nn.Parameter(torch.empty(D))
        set_roles(self, control=("ortho_alpha", "ortho_beta"))
        if not self.ortho_alpha.is_meta:  # `pgolf check` builds on meta: shapes only, nothing to draw
            nn.init.normal_(self.ortho_alpha, mean=oc.alpha_mean, std=oc.alpha_std)
            nn.init.normal_(self.ortho_beta, mean=oc.beta_mean, std=oc.beta_std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.result_type(x, y)  # what the standard x + y would return
        # fp32: <x, y>, <x, x> and sum(y) each add d terms; in bf16 they lose the small
        # differences that c and s are made of (and s feeds a division).
        xf, yf = x.float(), y.float()
        alpha, beta = self.ortho_alpha.float(), self.ortho_beta.float()
        c = (xf * yf).sum(-1, keepdim=True) / (xf * xf).sum(-1, keepdim=True).clamp_min(self.eps)
        orth = alpha * (yf - c * xf)
        if self.fixed:
            par = beta * (c * xf)
        else:
            s = yf.sum(-1, keepdim=True)
            s = s + torch.where(s >= 0, self.sum_eps, -self.sum_eps)  # |s| >= sum_eps; sign(0) = +
            par = beta * (c * yf / s)
        return (xf + orth + par).to(out_dtype)


@register("residual", "orthopar", reads=("orthopar",))
def orthopar(cfg: ModelConfig, layer_idx: int, site: str) -> nn.Module:
    return OrthoParResidual(cfg, fixed=False)


@register("residual", "orthopar_fixed", reads=("orthopar",))
def orthopar_fixed(cfg: ModelConfig, layer_idx: int, site: str) -> nn.Module:
    return OrthoParResidual(cfg, fixed=True)
