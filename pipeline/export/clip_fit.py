"""Fit the artifact under the byte cap by widening SD-clip (`quant.fit_clip`).

SD-clip sets each row's clip at k standard deviations (pipeline.export.codec.row_clip); a larger k
is a coarser step, so fewer distinct codes and fewer compressed bytes, at more quantization error.
The records tuned k by hand to land just under 16,000,000 bytes ("SDClip k is the single monotone
knob to land just under the cap", pg_mechanics.md §7.1 step 4). This does it for each run: when
the blob at the recipe's own k would not fit, every rule's clip_sigmas is multiplied by one scale
s in (1, max_scale], found by bisection, each trial a real quantize + pack of the trained weights
with the recipe's own packer (no estimate). The result is the smallest fitting s the bisection
reached; s = 1 when the blob fits as it is. The chosen k is in the blob's manifest (clip_sigmas).

Imported by name (pipeline.export.codec.extension) only for recipes with `quant.fit_clip`.

    fitted = fit_clip(state, recipe.quant, recipe.package, code_bytes, meta, roles=roles, calibration=cal)
    fitted.scale, fitted.qmodel, fitted.trials  # [(scale, bytes_total), ...] in the order tried
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pipeline.config import PackageConfig, QuantConfig
from pipeline.errors import SizeCapError
from pipeline.export.artifact import serialize
from pipeline.export.codec import compress
from pipeline.export.plan import QuantizedModel, quantize_state_dict


def scaled(quant: QuantConfig, scale: float) -> QuantConfig:
    """`quant` with every rule's clip_sigmas multiplied by `scale` (rules without it unchanged)."""
    rules = tuple(dataclasses.replace(r, clip_sigmas=r.clip_sigmas * scale) if r.clip_sigmas is not None else r
                  for r in quant.rules)
    return dataclasses.replace(quant, rules=rules)


def smallest_fitting_scale(total_at: Callable[[float], int], limit: int, max_scale: float,
                           steps: int) -> tuple[float, list[tuple[float, int]]]:
    """The smallest scale in [1, max_scale] whose `total_at(scale)` (bytes) is at most `limit`, to
    within (max_scale - 1) / 2**steps, assuming the total falls as the scale grows; with the
    (scale, total) of every trial. Calls total_at 1 time (fits at 1), else 2 + steps times.
    Raises SizeCapError when even max_scale does not fit."""
    trials: list[tuple[float, int]] = []

    def fits(scale: float) -> bool:
        trials.append((scale, int(total_at(scale))))
        return trials[-1][1] <= limit

    if fits(1.0):
        return 1.0, trials
    if not fits(max_scale):
        raise SizeCapError(
            f"the artifact is over its limit of {limit:,} bytes even with every clip_sigmas widened "
            f"{max_scale:g}x (quant.fit_clip.max_scale): {trials[0][1]:,} bytes at the recipe's clips, "
            f"{trials[1][1]:,} at {max_scale:g}x; raise quant.fit_clip.max_scale, or use fewer parameters "
            "or a stronger quant plan")
    lo, hi = 1.0, max_scale
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi, trials


@dataclass
class FittedExport:
    scale: float  # the clip_sigmas multiplier used (1.0: the recipe's own)
    qmodel: QuantizedModel  # quantized at that scale
    quant: QuantConfig  # the rules at that scale
    trials: list[tuple[float, int]] = field(default_factory=list)  # (scale, bytes_total) as tried


def fit_clip(state: Mapping, quant: QuantConfig, package: PackageConfig, code_bytes: int, meta: Mapping, *,
             roles: Mapping[str, str] | None = None, calibration: Mapping | None = None) -> FittedExport:
    """Quantize `state` under `quant` with its clip_sigmas widened just enough (quant.fit_clip) that
    the packed blob + `code_bytes` is at most package.cap_bytes - fit_clip.margin_bytes.
    Raises SizeCapError when quant.fit_clip.max_scale is not enough."""
    cfg = quant.fit_clip
    limit = package.cap_bytes - cfg.margin_bytes
    best: dict = {}

    def total_at(scale: float) -> int:
        q = scaled(quant, scale)
        qmodel = quantize_state_dict(state, q, roles=roles, calibration=calibration)
        total = len(compress(serialize(qmodel, meta), package.compressor, package.level)) + code_bytes
        if total <= limit:  # the bisection only moves down from a fitting scale: the last one is the answer
            best.update(scale=scale, quant=q, qmodel=qmodel)
        return total

    scale, trials = smallest_fitting_scale(total_at, limit, cfg.max_scale, cfg.steps)
    return FittedExport(scale=scale, quant=best["quant"], qmodel=best["qmodel"], trials=trials)
