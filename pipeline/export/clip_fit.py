"""Fit the artifact under the byte cap by widening SD-clip (`quant.fit_clip`).

SD-clip sets each row's clip at k standard deviations (pipeline.export.codec.row_clip); a larger k
is a coarser step, so fewer distinct codes and fewer compressed bytes, at more quantization error.
The records tuned k by hand to land just under 16,000,000 bytes ("SDClip k is the single monotone
knob to land just under the cap", pg_mechanics.md §7.1 step 4). This does it for each run: when
the blob at the recipe's own k would not fit, every rule's clip_sigmas is multiplied by one scale
s in (1, max_scale], found by bisection, each trial a real quantize + pack of the trained weights
with the recipe's own packer (no estimate). The result is the smallest fitting s the bisection
reached; s = 1 when the blob fits as it is. The chosen k is in the blob's manifest (clip_sigmas).
Only quant.rules are widened: quant.compare plans are reported at their own clips.

Imported by name (pipeline.export.codec.extension) only for recipes with `quant.fit_clip`.

    fitted = fit_clip(state, recipe.quant, recipe.package, code_bytes, meta, roles=roles, calibration=cal)
    fitted.scale, fitted.qmodel, fitted.packed, fitted.trials  # trials: [(scale, bytes_total), ...] as tried
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from pipeline.config import CLIP_FIT_MAX_SCALE, PackageConfig, QuantConfig
from pipeline.errors import SizeCapError, UserError
from pipeline.export.artifact import serialize
from pipeline.export.codec import compress
from pipeline.export.plan import QuantizedModel, named_shapes_of, quantize_state_dict, resolve_plan


def scaled(quant: QuantConfig, scale: float) -> QuantConfig:
    """`quant` with every rule's clip_sigmas multiplied by `scale` (rules without it unchanged)."""
    rules = tuple(dataclasses.replace(r, clip_sigmas=r.clip_sigmas * scale) if r.clip_sigmas is not None else r
                  for r in quant.rules)
    return dataclasses.replace(quant, rules=rules)


def smallest_fitting_scale(total_at: Callable[[float], int], limit: int, max_scale: float,
                           steps: int) -> tuple[Optional[float], list[tuple[float, int]]]:
    """The smallest scale in [1, max_scale] whose `total_at(scale)` (bytes) is at most `limit`, to
    within (max_scale - 1) / 2**steps, assuming the total falls as the scale grows (it does on
    average; at a resolution near 1e-3 compressed sizes wobble by a few hundred bytes, and the
    returned scale still fits: it is one that was tried); with the (scale, total) of every trial.
    Calls total_at 1 time (fits at 1), else 2 + steps times. None when even max_scale does not fit."""
    trials: list[tuple[float, int]] = []

    def fits(scale: float) -> bool:
        trials.append((scale, int(total_at(scale))))
        return trials[-1][1] <= limit

    if fits(1.0):
        return 1.0, trials
    if not fits(max_scale):
        return None, trials
    lo, hi = 1.0, max_scale
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi, trials


def limit_bytes(quant: QuantConfig, package: PackageConfig) -> int:
    return package.cap_bytes - quant.fit_clip.margin_bytes


def no_fit_message(quant: QuantConfig, package: PackageConfig, code_bytes: int,
                   trials: list[tuple[float, int]]) -> str:
    """Why no scale fits, and what could: the limit spelled out, and advice that can work."""
    cfg, limit = quant.fit_clip, limit_bytes(quant, package)
    where = (f"package.cap_bytes {package.cap_bytes:,} less quant.fit_clip.margin_bytes {cfg.margin_bytes:,}"
             if cfg.margin_bytes else "package.cap_bytes")
    tried = ", ".join(f"{total:,} bytes at {scale:g}x" for scale, total in trials)
    if code_bytes >= limit:
        advice = f"the code alone is {code_bytes:,} bytes, so no model fits; raise the limit"
    elif cfg.max_scale < CLIP_FIT_MAX_SCALE:
        advice = (f"raise quant.fit_clip.max_scale (at most {CLIP_FIT_MAX_SCALE:g}), or use fewer parameters or "
                  "a stronger quant plan")
    else:
        advice = "use fewer parameters or a stronger quant plan (int5 or int6 where rules have int8/fp16)"
    return (f"quant.fit_clip: the artifact does not fit its limit of {limit:,} bytes ({where}) even with every "
            f"clip_sigmas widened {cfg.max_scale:g}x ({tried}, code included); {advice}.")


def check_clipped(plan: list[dict], quant: QuantConfig) -> None:
    """Refuse quant.fit_clip when no tensor is quantized under a rule with clip_sigmas (earlier rules
    take every tensor those rules match): widening could not change a byte."""
    if any(entry.get("clip_sigmas") is not None for entry in plan):
        return
    rules = [i for i, r in enumerate(quant.rules) if r.clip_sigmas is not None]
    raise UserError(f"quant.fit_clip widens SD-clip, but no tensor is quantized under a rule with clip_sigmas: "
                    f"quant.rules {rules} set it, and earlier rules take every tensor they match. Move them up "
                    "(or narrow the earlier rules), or remove quant.fit_clip.")


@dataclass
class FittedExport:
    scale: float  # the clip_sigmas multiplier used (1.0: the recipe's own)
    qmodel: QuantizedModel  # quantized at that scale
    packed: bytes  # serialize(qmodel, meta) compressed by the recipe's packer: the blob to write
    trials: list[tuple[float, int]] = field(default_factory=list)  # (scale, bytes_total) as tried


def fit_clip(state: Mapping, quant: QuantConfig, package: PackageConfig, code_bytes: int, meta: Mapping, *,
             roles: Mapping[str, str] | None = None, calibration: Mapping | None = None) -> FittedExport:
    """Quantize `state` under `quant` with its clip_sigmas widened just enough (quant.fit_clip) that
    the packed blob + `code_bytes` is at most package.cap_bytes - fit_clip.margin_bytes.
    Raises SizeCapError when quant.fit_clip.max_scale is not enough."""
    cfg, limit = quant.fit_clip, limit_bytes(quant, package)
    check_clipped(resolve_plan(named_shapes_of(state), quant.rules, roles), quant)
    best: dict = {}

    def total_at(scale: float) -> int:
        qmodel = quantize_state_dict(state, scaled(quant, scale), roles=roles, calibration=calibration)
        packed = compress(serialize(qmodel, meta), package.compressor, package.level)
        if len(packed) + code_bytes <= limit:  # the bisection only moves down from a fitting scale: the last wins
            best.update(qmodel=qmodel, packed=packed)
        return len(packed) + code_bytes

    scale, trials = smallest_fitting_scale(total_at, limit, cfg.max_scale, cfg.steps)
    if scale is None:
        raise SizeCapError(no_fit_message(quant, package, code_bytes, trials))
    return FittedExport(scale=scale, qmodel=best["qmodel"], packed=best["packed"], trials=trials)
