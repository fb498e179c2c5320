"""Normalizers for learned mixing weights: z -> weights >= 0 that sum to 1 along `dim`.

Registered as kind "normalizer": `resolve("normalizer", name)(cfg)` returns fn(z, dim). The
unet_gpt trunk applies the one named by `model.mix_normalizer` to each block's resid_mix
[2, D] along dim 0 (x and x0, per channel); "none" (the default) keeps the raw mix. Only for
small gates and mixers: never attention or the LM head (seed_components.md §2.3).

- `softmax`: the exp reference.
- `shiftmax_recon_*`: OUR placeholder reconstructions of lof310's ShiftMax, whose formula is
  proprietary and unpublished (lof310/projects `components/shiftmax/README.md`). They share
  only its published properties: exp-free, shift-then-normalise, ratios linear in the gap.
  - `shiftmax_recon_min`:  (z - min z + EPS) / sum. Shift invariant; scale invariant up to EPS;
    the argmin gets ~EPS mass.
  - `shiftmax_recon_relu`: relu(z - max z + TAU) / sum. Shift invariant, sparse (elements more
    than TAU below the max get exactly 0); the max gets TAU, so the sum is >= TAU > 0.
  - `shiftmax_recon_sq`:   ((z - min z)^2 + EPS) / sum. Shift invariant; scale invariant up to EPS.

EPS = 1e-6: it only keeps the all-equal case (every z - min = 0) from dividing 0 by 0, so it
should be far below any gap a learned z holds, yet well above fp32's resolution of the O(1)
sums it joins (~1e-7). TAU = 2.0: resid_mix starts at (1, 0), a gap of 1. With TAU <= 1 that
init would sit at or past the relu's kink, x0's weight would be exactly 0 with zero gradient in
both entries, and the mix could never move; TAU = 2 starts it at (2/3, 1/3) (softmax: 0.73,
0.27) with live gradients, and x0 is switched off only once a channel learns a gap >= 2.

Note for two sources (resid_mix): any map that is both shift and scale invariant depends only
on sign(z0 - z1), so recon_min and recon_sq act there as a near-hard per-channel switch
((1 - EPS, EPS) or the reverse), with gradients of order EPS / gap^2.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.model.registry import register

EPS = 1e-6
TAU = 2.0

Normalizer = Callable[[torch.Tensor, int], torch.Tensor]


def _normalise(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w / w.sum(dim, keepdim=True)


def softmax(z: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(z, dim)


def shiftmax_recon_min(z: torch.Tensor, dim: int) -> torch.Tensor:
    return _normalise(z - z.amin(dim, keepdim=True) + EPS, dim)


def shiftmax_recon_relu(z: torch.Tensor, dim: int) -> torch.Tensor:
    return _normalise(torch.relu(z - z.amax(dim, keepdim=True) + TAU), dim)


def shiftmax_recon_sq(z: torch.Tensor, dim: int) -> torch.Tensor:
    return _normalise((z - z.amin(dim, keepdim=True)).square() + EPS, dim)


# Each map is registered under its own function name. The factories ignore cfg: EPS and TAU
# are fixed above, not recipe knobs.
for _fn in (softmax, shiftmax_recon_min, shiftmax_recon_relu, shiftmax_recon_sq):
    register("normalizer", _fn.__name__)(lambda cfg, fn=_fn: fn)
