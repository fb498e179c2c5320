"""Seed statistics and the challenge's record test, in nats per token.

The challenge admits a new record when it beats the current one by at least 0.005 nats per
token and the logs show it at p < 0.01 (`reference/pg_mechanics.md` §5.3). Records showed it
with Welch's t-test against the previous record's per-seed scores, e.g.
`records/track_10min_16mb/2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072` in openai/parameter-golf
(t = -11.83, df = 3.31 against PR #549). This module holds that arithmetic:

* `describe(values)`: n, mean, sample std (ddof = 1), 95 % two-sided t-interval of the mean.
* `welch_improvement(new, baseline)`: the one-sided Welch test of the improvement
  Δ = mean(baseline) − mean(new) (val_loss, nats/token; positive means NEW is better) with
  H0: Δ ≤ margin against H1: Δ > margin.

The standard error and the Welch–Satterthwaite degrees of freedom are computed here; the
Student t distribution (sf, ppf) is scipy's. `tests/test_stats.py` holds the p-values to
`scipy.stats.ttest_ind(..., equal_var=False)`. The command line is `pgolf compare NEW BASELINE`
(pipeline/compare.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from pipeline.errors import UserError

MARGIN_NATS = 0.005  # root README of openai/parameter-golf: beat SOTA by >= 0.005 nats
ALPHA = 0.01  # ... at p < 0.01
CONFIDENCE = 0.95  # the two-sided interval printed beside each mean and beside Δ

RECORD = "record"
NOT_SIGNIFICANT = "not significant"


def _student_t():
    # Imported on use: scipy.stats takes ~0.5 s to import and `pgolf` imports this module
    # for every command.
    from scipy.stats import t

    return t


def _checked(values: Sequence[float], what: str) -> list[float]:
    try:
        xs = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: every value must be a number ({e}).") from None
    if not xs:
        raise UserError(f"{what}: no values; give one val_loss per seed.")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise UserError(f"{what}: non-finite value {bad[0]!r}; a diverged seed has no score to compare, "
                        f"rerun it or leave it out and say so.")
    return xs


def _mean_var(xs: list[float]) -> tuple[float, float]:
    """Mean and sample variance (ddof = 1; 0.0 for one value), by two passes of exactly rounded sums."""
    n = len(xs)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def describe(values: Sequence[float], *, what: str = "values") -> dict:
    """Summary of per-seed figures (in their own unit: nats/token for val_loss, bits/byte for val_bpb).

    Returns {"n", "mean", "std" (sample, ddof = 1), "ci95_low", "ci95_high" (two-sided 95 % Student t
    interval of the mean), "note"}. With one value the sample std is undefined: std and the interval
    are None and "note" says why; otherwise "note" is None.
    Raises UserError (naming `what`) on no values, a non-number or a non-finite value.
    """
    xs = _checked(values, what)
    n = len(xs)
    mean, var = _mean_var(xs)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None,
                "note": "one value: no spread to estimate, so no interval (run more seeds)"}
    std = math.sqrt(var)
    half = float(_student_t().ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "note": None}


def fixed8(x: Optional[float]) -> str:
    """`x` with 8 decimals, or "none" for a figure one value cannot give (a std, an interval)."""
    return "none" if x is None else f"{x:.8f}"


def require_seeds(label: str, n: int) -> None:
    """Raise UserError (naming `label`) when one side of a Welch test has fewer than 2 per-seed values:
    the test needs each side's variance. Callers that can check before any work (submit --against,
    compare before its tokenizer check) use this same rule."""
    if n < 2:
        raise UserError(f"{label} has {n} per-seed value; Welch's t-test needs at least 2 per side to "
                        f"estimate a variance (records use 3 seeds): run more seeds.")


@dataclass(frozen=True)
class WelchResult:
    """One-sided Welch test of Δ = mean(baseline) − mean(new) > margin, all in nats/token.

    t = (Δ − margin) / se, p = P(T_df ≥ t). `lower_bound` is the one-sided (1 − alpha) lower
    confidence bound of Δ, so verdict == "record" exactly when lower_bound > margin.
    `ci95_low`/`ci95_high` is the two-sided 95 % interval of Δ.
    """

    new: dict  # describe() of the new per-seed val_loss
    baseline: dict  # describe() of the baseline per-seed val_loss
    margin: float
    alpha: float
    delta: float
    se: float
    df: float
    t: float
    p_value: float
    lower_bound: float
    ci95_low: float
    ci95_high: float
    verdict: str  # RECORD or NOT_SIGNIFICANT

    @property
    def below_margin(self) -> bool:
        """Δ itself is not above the margin: no number of seeds could make this a record."""
        return self.delta <= self.margin

    def key_values(self) -> list[tuple[str, str]]:
        kv: list[tuple[str, str]] = []
        for side, d in (("new", self.new), ("baseline", self.baseline)):
            kv += [(f"{side}_n", str(d["n"])), (f"{side}_val_loss_mean", f"{d['mean']:.8f}"),
                   (f"{side}_val_loss_std", fixed8(d["std"])),
                   (f"{side}_val_loss_ci95_low", fixed8(d["ci95_low"])),
                   (f"{side}_val_loss_ci95_high", fixed8(d["ci95_high"]))]
        kv += [
            ("margin_nats", f"{self.margin:g}"), ("alpha", f"{self.alpha:g}"),
            ("delta_nats", f"{self.delta:.8f}"),  # baseline − new: positive means NEW is better
            ("delta_nats_se", f"{self.se:.8f}"),
            ("delta_nats_ci95_low", f"{self.ci95_low:.8f}"), ("delta_nats_ci95_high", f"{self.ci95_high:.8f}"),
            ("delta_nats_lower_bound", f"{self.lower_bound:.8f}"),
            ("lower_bound_confidence", f"{1 - self.alpha:g}"),
            ("welch_df", f"{self.df:.10g}"), ("t_statistic", f"{self.t:.10g}"), ("p_value", f"{self.p_value:.10g}"),
            ("below_margin", str(self.below_margin).lower()), ("verdict", self.verdict),
        ]
        return kv

    def verdict_line(self, new_label: str = "NEW", baseline_label: str = "BASELINE") -> str:
        """One sentence for people: the verdict, then why."""
        test = (f"one-sided Welch test of delta > {self.margin:g}: t={self.t:.3f}, df={self.df:.2f}, "
                f"p={self.p_value:.3g}")
        if self.verdict == RECORD:
            return (f"{RECORD}: {new_label} is {self.delta:.5f} nats/token better than {baseline_label} "
                    f"({test} < {self.alpha:g}; the one-sided {100 * (1 - self.alpha):g}% lower bound "
                    f"{self.lower_bound:.5f} "
                    f"clears the {self.margin:g}-nat margin).")
        if self.delta <= 0:
            why = f"{new_label} is not better than {baseline_label} (delta={self.delta:.5f} nats/token)"
        elif self.below_margin:
            why = (f"the improvement {self.delta:.5f} nats/token is below the {self.margin:g}-nat margin a record "
                   f"must clear (an observed delta at or below the margin gives p >= 0.5 at any number of seeds)")
        else:
            why = (f"the improvement {self.delta:.5f} nats/token is above the {self.margin:g}-nat margin but not "
                   f"significantly (p >= {self.alpha:g}); more seeds or a larger gain are needed")
        return f"{NOT_SIGNIFICANT}: {why} ({test})."

    def lines(self, new_label: str = "NEW", baseline_label: str = "BASELINE") -> list[str]:
        """`key=value` lines, then the human verdict line."""
        return [f"{k}={v}" for k, v in self.key_values()] + [self.verdict_line(new_label, baseline_label)]


def welch_improvement(new: Sequence[float], baseline: Sequence[float], *, margin: float = MARGIN_NATS,
                      alpha: float = ALPHA, new_label: str = "NEW",
                      baseline_label: str = "BASELINE") -> WelchResult:
    """One-sided Welch t-test that NEW's per-seed val_loss (nats/token) beats BASELINE's by more than `margin`.

    Δ = mean(baseline) − mean(new); se = sqrt(s_b²/n_b + s_n²/n_n); df by Welch–Satterthwaite;
    t = (Δ − margin)/se; p = sf(t, df) of Student's t (scipy). Verdict "record" when p < alpha.
    Raises UserError (naming the side by its label) when a side has fewer than 2 values (Welch
    needs each side's variance), a value is not a finite number, both sides have zero spread
    (the statistic is undefined), margin is negative or not finite, or alpha is not in (0, 1).
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise UserError(f"margin {margin!r} must be a finite number of nats >= 0 (the challenge's is {MARGIN_NATS}).")
    if not 0 < alpha < 1:
        raise UserError(f"alpha {alpha!r} must be between 0 and 1 (the challenge's is {ALPHA}).")
    xs_new = _checked(new, new_label)
    xs_base = _checked(baseline, baseline_label)
    for label, xs in ((new_label, xs_new), (baseline_label, xs_base)):
        require_seeds(label, len(xs))
    n_new, n_base = len(xs_new), len(xs_base)
    mean_new, var_new = _mean_var(xs_new)
    mean_base, var_base = _mean_var(xs_base)
    vn_new, vn_base = var_new / n_new, var_base / n_base
    se2 = vn_new + vn_base
    if se2 == 0.0:
        raise UserError(f"{new_label} and {baseline_label} both have zero spread (every seed identical), so the "
                        f"Welch statistic is undefined; check the values are per-seed scores, not copies of a mean.")
    se = math.sqrt(se2)
    # Welch (1947) / Satterthwaite (1946) effective degrees of freedom.
    df = se2 * se2 / (vn_new * vn_new / (n_new - 1) + vn_base * vn_base / (n_base - 1))
    delta = mean_base - mean_new
    t_stat = (delta - margin) / se
    dist = _student_t()
    p = float(dist.sf(t_stat, df))
    lower = delta - float(dist.ppf(1 - alpha, df)) * se
    half95 = float(dist.ppf(0.5 + CONFIDENCE / 2, df)) * se
    return WelchResult(
        new=describe(xs_new, what=new_label), baseline=describe(xs_base, what=baseline_label),
        margin=margin, alpha=alpha, delta=delta, se=se, df=df, t=t_stat, p_value=p, lower_bound=lower,
        ci95_low=delta - half95, ci95_high=delta + half95, verdict=RECORD if p < alpha else NOT_SIGNIFICANT)
