"""Learning-rate warm-down and Muon momentum warm-up, applied to the optimizers each step.

Use, once per step before `opt.step()`:
    mul = lr_multiplier(step, recipe.train, elapsed_s)     # elapsed = timed training seconds
    apply_schedule(optimizers, mul, muon_momentum(step, recipe.optim))

All groups share one multiplier on their `base_lr` (set by `build_optimizers`), as in the
baseline (pg_mechanics.md §3.4). There is no LR warm-up: the baseline's "warmup steps" are
compile priming, after which the state is reset.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from pipeline.config import OptimConfig, TrainConfig
from pipeline.optim.muon import Muon


def _step_rule(step: int, max_steps: int, warmdown_steps: int) -> float:
    # Linear from 1 at step max_steps - warmdown_steps to 0 at max_steps. A warm-down longer
    # than the run simply starts below 1, as the baseline's iteration rule does.
    if warmdown_steps <= 0:
        return 1.0
    remaining = max_steps - step
    if remaining >= warmdown_steps:
        return 1.0
    return max(remaining / warmdown_steps, 0.0)


def _time_rule(step: int, cap_s: float, warmdown_steps: int, elapsed_s: float) -> float:
    # Baseline wall-clock rule: the warm-down lasts warmdown_steps x (average step time so far),
    # ending exactly at the cap. Step 0 has no timing yet, so the multiplier is 1.
    if step <= 0 or warmdown_steps <= 0:
        return 1.0
    step_s = elapsed_s / step
    warmdown_s = warmdown_steps * step_s
    remaining_s = max(cap_s - elapsed_s, 0.0)
    if warmdown_s <= 0.0 or remaining_s > warmdown_s:
        return 1.0
    return remaining_s / warmdown_s


def lr_multiplier(step: int, cfg: TrainConfig, elapsed_s: float) -> float:
    """The LR multiplier in [0, 1] for `step` (0-based, the step about to be taken).

    warmdown_by "steps": linear to 0 over the last `warmdown_steps` of `max_steps`.
    warmdown_by "time": the baseline rule against `max_wallclock_s` with step time estimated as
    elapsed_s / step; without a wall-clock cap it falls back to the step rule, as the baseline.
    Either is floored at `min_lr_mul` (PR #1787's MIN_LR) when that is set.
    """
    if cfg.warmdown_by == "time" and cfg.max_wallclock_s > 0:
        mul = _time_rule(step, cfg.max_wallclock_s, cfg.warmdown_steps, elapsed_s)
    else:
        mul = _step_rule(step, cfg.max_steps, cfg.warmdown_steps)
    return max(mul, cfg.min_lr_mul) if cfg.min_lr_mul > 0 else mul


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Muon momentum: linear from muon_momentum_warmup_start to muon_momentum over
    muon_momentum_warmup_steps steps, then constant (0.85 -> 0.95 over 500 in the baseline,
    0.92 -> 0.99 over 1500 in later records, §4.7.1)."""
    n = cfg.muon_momentum_warmup_steps
    frac = 1.0 if n <= 0 else min(max(step, 0) / n, 1.0)
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def apply_schedule(
    optimizers: Iterable[torch.optim.Optimizer], lr_mul: float, momentum: Optional[float] = None
) -> None:
    """Set every group's lr to base_lr * lr_mul and, when given, every Muon group's momentum.

    A group without `base_lr` is an error: it would silently keep a stale lr."""
    for opt in optimizers:
        is_muon = isinstance(opt, Muon)
        for group in opt.param_groups:
            if "base_lr" not in group:
                raise KeyError(f"{type(opt).__name__} param group has no 'base_lr'; "
                               "build optimizers with pipeline.optim.build_optimizers")
            group["lr"] = group["base_lr"] * lr_mul
            if is_muon and momentum is not None:
                group["momentum"] = momentum
