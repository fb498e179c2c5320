"""`pgolf compare NEW BASELINE`: is NEW a record over BASELINE by the challenge's rule?

    pgolf compare records/track_10min_16mb/2026-05-01_mine  path/to/previous_record/submission.json
    pgolf compare my_seeds.txt baseline_seeds.txt --margin 0.005 --alpha 0.01

The rule (`reference/pg_mechanics.md` §5.3): at least 0.005 nats per token better, at p < 0.01.
The test is the one-sided Welch t-test of pipeline/stats.py on the per-seed val_loss
(nats/token); val_bpb means are printed beside it when both sides have them.

NEW and BASELINE are each one of:

* a records folder: its `submission.json` is read;
* a `submission.json` (any file whose text is a JSON object): per-seed figures from
  `seed_results` {seed: {"val_loss": ..., "val_bpb": ...}} as the challenge's records write
  them (§5.2). Top-level `tokenizer`, `tokenizer_sha256` or `vocab_size`, where present, identify
  the tokenizer;
* a text file of per-seed values, one seed per line: `VAL_LOSS` or `VAL_LOSS,VAL_BPB`
  (comma or white space between). `#` starts a comment; blank lines are skipped. An optional
  first line names the columns, from `seed`, `val_loss`, `val_bpb`, e.g. `seed,val_loss,val_bpb`.

Nats per token depend on the tokenizer (a larger vocabulary means fewer, costlier tokens), so
two sides are compared only when nothing says they differ: explicit tokenizer fields must match,
and where both sides have val_loss and val_bpb per seed, val_bpb·ln2/val_loss (the validation
set's tokens per byte, §2.6; a fingerprint of tokenizer and validation set) must agree to 0.1 %.

Prints `key=value` lines (the difference Δ = baseline − new in nats, its standard error, the
two-sided 95 % interval and the one-sided 99 % lower bound, Welch's df, t, the p-value, the
verdict) and a last line in words. Exit status 0 whatever the verdict; bad inputs exit 2 with
one `error:` line. `pgolf submit --against BASELINE` calls `compare_against`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.stats import ALPHA, MARGIN_NATS, WelchResult, describe, fixed8, require_seeds, welch_improvement

# Top-level submission.json fields that name the tokenizer. "tokenizer" and "vocab_size" occur in
# published records (openai/parameter-golf records/track_10min_16mb/2026-04-06_SP8192_QK5_LegalTTT_1.0828
# and 2026-03-19_MLP3x_QAT_Int6_SlidingWindow).
TOKENIZER_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size")

# Relative agreement required of val_bpb·ln2/val_loss across seeds and sides. Published figures
# are rounded to 4-8 decimals (at worst ~5e-5 relative); tokenizers differ by tens of percent
# (sp1024 0.4105 tokens/byte, sp8192 0.2683) and even sp1024 on the older validation export by
# 0.26 % (pg_mechanics §2.6), so 0.1 % separates the two.
TOKENS_PER_BYTE_RTOL = 1e-3

COLUMNS = ("seed", "val_loss", "val_bpb")
FORMATS = ("a records folder, a submission.json, or a text file of per-seed values "
           "(one seed per line: VAL_LOSS or VAL_LOSS,VAL_BPB)")


@dataclass(frozen=True)
class Sample:
    """Per-seed scores of one side. val_loss in nats/token, val_bpb in bits/byte (None when not every seed has it)."""

    source: str
    val_loss: tuple[float, ...]
    val_bpb: tuple[float, ...] | None = None
    seeds: tuple[str, ...] | None = None
    tokenizer: dict = field(default_factory=dict)  # the TOKENIZER_KEYS the input carries

    def tokens_per_byte(self) -> list[float] | None:
        """val_bpb·ln2/val_loss per seed (= scored tokens / scored bytes), or None without val_bpb."""
        if self.val_bpb is None:
            return None
        return [b * math.log(2) / v for v, b in zip(self.val_loss, self.val_bpb)]


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where} is {v!r}, not a number.")
    x = float(v)
    if not math.isfinite(x) or x <= 0:
        raise UserError(f"{where} is {x!r}; a score must be a finite positive number (a diverged seed has none: "
                        f"rerun it or leave it out and say so).")
    return x


def _from_submission(path: Path, data) -> Sample:
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object (a submission.json), got {type(data).__name__}.")
    results = data.get("seed_results")
    if not isinstance(results, dict) or not results:
        mean = ", ".join(f"{k}={data[k]}" for k in ("val_loss", "val_bpb") if k in data)
        has = f"has only the mean ({mean}) and " if mean else ""
        raise UserError(f"{path} {has}no per-seed \"seed_results\" {{seed: {{\"val_loss\": ...}}}}; the test needs "
                        f"every seed's val_loss: copy them from the logs' `..._exact val_loss:` lines into a text "
                        f"file, one per line, and pass that file.")
    seeds = tuple(str(s) for s in results)
    for s in seeds:
        if not isinstance(results[s], dict):
            raise UserError(f"{path}: seed_results[{s}] is {results[s]!r}, not an object with val_loss and val_bpb.")
    lacking = [s for s in seeds if "val_loss" not in results[s]]
    if lacking:
        only_bpb = all("val_bpb" in results[s] for s in lacking)
        raise UserError(
            f"{path}: seed_results for seed(s) {', '.join(lacking)} "
            + ("give val_bpb but no val_loss" if only_bpb else "have no val_loss")
            + "; the record margin is 0.005 nats per token, which only val_loss carries (bits per byte convert "
            "to nats only through the tokenizer's tokens per byte, pg_mechanics §2.6): add each seed's val_loss "
            "from its log's `..._exact val_loss:` line.")
    loss = tuple(_number(results[s]["val_loss"], f"{path}: seed_results[{s}].val_loss") for s in seeds)
    bpb = None
    if all("val_bpb" in results[s] for s in seeds):
        bpb = tuple(_number(results[s]["val_bpb"], f"{path}: seed_results[{s}].val_bpb") for s in seeds)
    tok = {k: data[k] for k in TOKENIZER_KEYS if data.get(k) is not None}
    return Sample(str(path), loss, bpb, seeds, tok)


def _from_text(path: Path, text: str) -> Sample:
    columns: tuple[str, ...] | None = None
    rows: list[dict] = []
    hint = "each line is VAL_LOSS or VAL_LOSS,VAL_BPB (nats/token, bits/byte); '#' starts a comment"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = [t for t in re.split(r"[,\s]+", line) if t]
        if columns is None and not rows and not _is_float(tokens[0]):
            names = tuple(t.lower() for t in tokens)
            unknown = [t for t in names if t not in COLUMNS]
            if unknown:
                raise UserError(f"{path}:{lineno}: {unknown[0]!r} is neither a number nor a column name "
                                f"({', '.join(COLUMNS)}); {hint}.")
            if len(set(names)) != len(names):
                raise UserError(f"{path}:{lineno}: a column is named twice in {line!r}.")
            if "val_loss" not in names:
                raise UserError(f"{path}:{lineno}: the columns {', '.join(names)} have no val_loss; the record "
                                f"margin is 0.005 nats per token, which only val_loss carries (pg_mechanics §2.6): "
                                f"add each seed's val_loss from its log's `..._exact val_loss:` line.")
            columns = names
            continue
        cols = columns or ("val_loss", "val_bpb")[:len(tokens)]
        if len(tokens) != len(cols):
            want = ",".join(columns) if columns else "VAL_LOSS or VAL_LOSS,VAL_BPB"
            raise UserError(f"{path}:{lineno}: {len(tokens)} values in {line!r}, expected {want}.")
        row = {}
        for name, tok in zip(cols, tokens):
            if name == "seed":
                row[name] = tok
                continue
            if not _is_float(tok):
                raise UserError(f"{path}:{lineno}: {tok!r} is not a number; {hint}.")
            row[name] = _number(float(tok), f"{path}:{lineno}: {name}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no per-seed values found; {hint}.")
    if columns is None and len({len(r) for r in rows}) > 1:
        raise UserError(f"{path}: some lines give val_bpb and some do not; give it on every line or on none.")
    bpb = tuple(r["val_bpb"] for r in rows) if "val_bpb" in rows[0] else None
    seeds = tuple(r["seed"] for r in rows) if "seed" in rows[0] else None
    return Sample(str(path), tuple(r["val_loss"] for r in rows), bpb, seeds)


def _is_float(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def load_sample(path: str | Path) -> Sample:
    """Read one side's per-seed scores from a records folder, a submission.json or a text file (module docstring).

    Raises UserError naming the path (and line) for a missing file, unreadable or malformed
    content, a seed without val_loss, a value that is not a finite positive number, or no values.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "submission.json").is_file():
            raise UserError(f"{p} is a folder without a submission.json; give {FORMATS}.")
        p = p / "submission.json"
    elif not p.exists():
        raise UserError(f"{p}: no such file or folder; give {FORMATS}.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read it as UTF-8 text ({e}); give {FORMATS}.") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}).") from None
        return _from_submission(p, data)
    return _from_text(p, text)


def sample_from_values(val_loss: Sequence[float], val_bpb: Sequence[float] | None = None, *,
                       source: str = "this submission", seeds: Sequence | None = None,
                       tokenizer: dict | None = None) -> Sample:
    """A Sample from in-memory per-seed scores (val_loss nats/token; val_bpb bits/byte, same order).

    Raises UserError when a value is not a finite positive number or the two lists differ in length.
    """
    loss = tuple(_number(v, f"{source}: val_loss[{i}]") for i, v in enumerate(val_loss))
    bpb = None
    if val_bpb is not None:
        if len(val_bpb) != len(loss):
            raise UserError(f"{source}: {len(val_bpb)} val_bpb values for {len(loss)} val_loss values.")
        bpb = tuple(_number(v, f"{source}: val_bpb[{i}]") for i, v in enumerate(val_bpb))
    return Sample(source, loss, bpb, tuple(str(s) for s in seeds) if seeds is not None else None,
                  {k: v for k, v in (tokenizer or {}).items() if k in TOKENIZER_KEYS and v is not None})


def _norm(v) -> str:
    return str(v).strip().casefold()


def tokenizer_check(new: Sample, baseline: Sample) -> str:
    """What showed NEW and BASELINE used one tokenizer and validation set (a short text for the report).

    Raises UserError when a tokenizer field both carry differs, or when val_bpb·ln2/val_loss
    (tokens per byte) differs by more than TOKENS_PER_BYTE_RTOL within a side or between them.
    """
    checked = []
    for key in TOKENIZER_KEYS:
        if key in new.tokenizer and key in baseline.tokenizer:
            a, b = new.tokenizer[key], baseline.tokenizer[key]
            if _norm(a) != _norm(b):
                raise UserError(f"{new.source} and {baseline.source} were scored with different tokenizers "
                                f"({key} {a!r} vs {b!r}); nats per token are comparable only on the same tokenizer "
                                f"(pg_mechanics §2.6): compare against a baseline scored with the same one.")
            checked.append(key)
    ratios = {}
    for s in (new, baseline):
        r = s.tokens_per_byte()
        if r is None:
            continue
        lo, hi = min(r), max(r)
        if hi - lo > TOKENS_PER_BYTE_RTOL * lo:
            raise UserError(f"{s.source}: the seeds disagree on val_bpb*ln2/val_loss, the tokens per byte of the "
                            f"validation set ({lo:.5f} to {hi:.5f}): they were not all scored with one tokenizer "
                            f"and validation set, or a val_bpb does not belong to its val_loss.")
        ratios[s.source] = math.fsum(r) / len(r)
    if len(ratios) == 2:
        a, b = ratios[new.source], ratios[baseline.source]
        if abs(a - b) > TOKENS_PER_BYTE_RTOL * min(a, b):
            raise UserError(f"{new.source} scores {a:.5f} tokens per byte and {baseline.source} {b:.5f} "
                            f"(val_bpb*ln2/val_loss): different tokenizers or validation sets, so their nats per "
                            f"token are not comparable (pg_mechanics §2.6); compare against a baseline scored with "
                            f"the same tokenizer on the same validation set.")
        checked.append("tokens_per_byte")
    if checked:
        return ",".join(checked)
    return ("none (neither a shared tokenizer field nor val_bpb with val_loss on both sides: make sure both used the "
            "same tokenizer and validation set)")


@dataclass(frozen=True)
class ComparisonResult:
    """NEW against BASELINE: the Welch test in nats (`welch`), bpb means where both sides have them."""

    new: Sample
    baseline: Sample
    welch: WelchResult
    tokenizer_check: str

    @property
    def verdict(self) -> str:
        return self.welch.verdict

    @property
    def p_value(self) -> float:
        return self.welch.p_value

    def lines(self) -> list[str]:
        """`key=value` lines (sources, per-side means, the test) and a last line in words."""
        out = [f"new={self.new.source}", f"baseline={self.baseline.source}"]
        kv = self.welch.key_values()
        split = next(i for i, (k, _) in enumerate(kv) if k == "margin_nats")
        out += [f"{k}={v}" for k, v in kv[:split]]
        for side, s in (("new", self.new), ("baseline", self.baseline)):
            if s.seeds is not None:
                out.append(f"{side}_seeds={','.join(s.seeds)}")
            if s.val_bpb is not None:
                d = describe(s.val_bpb, what=f"{s.source} val_bpb")
                out += [f"{side}_val_bpb_mean={d['mean']:.8f}", f"{side}_val_bpb_std={fixed8(d['std'])}"]
                out.append(f"{side}_tokens_per_byte={math.fsum(s.tokens_per_byte()) / len(s.val_loss):.6f}")
        if self.new.val_bpb is not None and self.baseline.val_bpb is not None:
            delta_bpb = math.fsum(self.baseline.val_bpb) / len(self.baseline.val_bpb) \
                - math.fsum(self.new.val_bpb) / len(self.new.val_bpb)
            out.append(f"delta_bpb={delta_bpb:.8f}")  # informational; the rule is in nats
        out.append(f"tokenizer_check={self.tokenizer_check}")
        out += [f"{k}={v}" for k, v in kv[split:]]
        out.append(self.welch.verdict_line("NEW", "BASELINE"))
        return out


def compare_samples(new: Sample, baseline: Sample, *, margin: float = MARGIN_NATS,
                    alpha: float = ALPHA) -> ComparisonResult:
    """One-sided Welch test that NEW's val_loss beats BASELINE's by more than `margin` nats/token at p < alpha.

    Raises UserError when a side has fewer than 2 seeds, the tokenizers differ (tokenizer_check),
    or margin/alpha are out of range (pipeline.stats.welch_improvement).
    """
    for side, s in (("NEW", new), ("BASELINE", baseline)):
        require_seeds(f"{side} {s.source}", len(s.val_loss))
    check = tokenizer_check(new, baseline)
    welch = welch_improvement(new.val_loss, baseline.val_loss, margin=margin, alpha=alpha,
                              new_label=f"NEW {new.source}", baseline_label=f"BASELINE {baseline.source}")
    return ComparisonResult(new, baseline, welch, check)


def compare_paths(new_path: str | Path, baseline_path: str | Path, *, margin: float = MARGIN_NATS,
                  alpha: float = ALPHA) -> ComparisonResult:
    """`pgolf compare NEW BASELINE` without printing. Raises UserError as load_sample and compare_samples do."""
    return compare_samples(load_sample(new_path), load_sample(baseline_path), margin=margin, alpha=alpha)


def compare_against(new_val_loss: Sequence[float], baseline_path: str | Path, *,
                    new_val_bpb: Sequence[float] | None = None, new_seeds: Sequence | None = None,
                    new_tokenizer: dict | None = None, new_source: str = "this submission",
                    margin: float = MARGIN_NATS, alpha: float = ALPHA) -> ComparisonResult:
    """For `pgolf submit --against BASELINE`: this run's per-seed val_loss (nats/token) against BASELINE.

    new_val_bpb (bits/byte, same seed order) enables the tokens-per-byte check and the bpb
    means; new_tokenizer may carry TOKENIZER_KEYS (e.g. {"vocab_size": 1024}).
    Raises UserError as load_sample and compare_samples do.
    """
    new = sample_from_values(new_val_loss, new_val_bpb, source=new_source, seeds=new_seeds, tokenizer=new_tokenizer)
    return compare_samples(new, load_sample(baseline_path), margin=margin, alpha=alpha)


@click.command("compare")
@click.argument("new", metavar="NEW")
@click.argument("baseline", metavar="BASELINE")
@click.option("--margin", type=float, default=MARGIN_NATS, show_default=True,
              help="Required improvement in nats per token (val_loss).")
@click.option("--alpha", type=float, default=ALPHA, show_default=True, help="Significance level of the one-sided test.")
def compare_cmd(new, baseline, margin, alpha):
    """Is NEW a record over BASELINE? One-sided Welch t-test on per-seed val_loss (nats).

    NEW and BASELINE are each a records folder, a submission.json, or a text file with one
    seed per line (VAL_LOSS or VAL_LOSS,VAL_BPB).
    """
    for line in compare_paths(new, baseline, margin=margin, alpha=alpha).lines():
        click.echo(line)
