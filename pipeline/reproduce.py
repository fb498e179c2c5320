"""`pgolf reproduce RECIPE [--seeds ...]`: run a published entry's seeds and set our figures beside
the ones its source published, without writing a records folder.

A recipe that reproduces a published entry carries the source's per-seed figures in a top-level
`published:` section (read here, never part of the run's settings, so it costs no code bytes):

    published:
      source: PR #684 logs train_log_seed{13,1111,1337}.txt (seed_prs.md §5)
      figures:
        - name: pre_ttt_val_bpb
          ours: val_bpb_prequant          # the report.json key it is set beside
          note: theirs raw final-step weights, non-sliding; ours EMA, sliding stride 64
          per_seed: {13: 1.1417, 1111: 1.1404, 1337: 1.1407}

Every figure names what the source measured and how ours differs, because a reproduction whose
method differs (the published #684 number trained on the validation set before scoring it) must
say so next to the number. Each seed runs through `pgolf run`'s cached stages.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable, Optional

from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline.errors import UserError

REPORT_KEYS = ("val_bpb", "val_loss", "val_bpb_prequant", "val_bpb_roundtrip", "val_bpb_ttt", "steps", "bytes_total",
               "bytes_model", "train_time_s", "eval_time_s")


@dataclasses.dataclass(frozen=True)
class PublishedFigure:
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)
    name: str
    ours: str  # a report.json key (REPORT_KEYS)
    per_seed: dict[int, float]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Published:
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)
    source: str
    figures: tuple[PublishedFigure, ...]

    @property
    def seeds(self) -> list[int]:
        return sorted({s for f in self.figures for s in f.per_seed})


def load_published(recipe: str) -> Optional[Published]:
    """The recipe's `published:` section, validated (None when it has none)."""
    from pipeline.recipe_files import compose, resolve_recipe_path

    path = resolve_recipe_path(recipe)
    raw = compose(path).get("published")
    if raw is None:
        return None
    try:
        published = TypeAdapter(Published).validate_json(json.dumps(raw))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: published.{where}: {first['msg']}.") from None
    unknown = [f.ours for f in published.figures if f.ours not in REPORT_KEYS]
    if unknown:
        raise UserError(f"{path}: published figure(s) compared with {unknown}, which report.json does not have; "
                        f"use one of {', '.join(REPORT_KEYS)}.")
    return published


def comparison_lines(published: Published, reports: dict[int, dict]) -> list[str]:
    """One line per (figure, seed) with theirs, ours and the difference, then the means."""
    lines = [f"published_source={published.source}"]
    for fig in published.figures:
        pairs = []
        for seed in sorted(reports):
            ours = reports[seed].get(fig.ours)
            theirs = fig.per_seed.get(seed)
            if ours is None:
                continue
            shown = f"{theirs:.8g}" if theirs is not None else "n/a"
            diff = f"{ours - theirs:+.6g}" if theirs is not None else "n/a (not published for this seed)"
            lines.append(f"reproduce figure={fig.name} seed={seed} theirs={shown} ours({fig.ours})={ours:.8g} "
                         f"diff={diff}")
            if theirs is not None:
                pairs.append((theirs, ours))
        if pairs:
            mean_theirs = statistics.fmean(t for t, _ in pairs)
            mean_ours = statistics.fmean(o for _, o in pairs)
            lines.append(f"reproduce figure={fig.name} seeds={len(pairs)} mean_theirs={mean_theirs:.8g} "
                         f"mean_ours={mean_ours:.8g} diff={mean_ours - mean_theirs:+.6g}"
                         + (f"  ({fig.note})" if fig.note else ""))
    return lines


def reproduce(recipe_name: str, seeds: Optional[list[int]], overrides, data_dir: Optional[Path], out_root: Path,
              device: str = "auto", echo: Callable[[str], None] = print, embedded=None,
              progress_factory=None) -> list[str]:
    """Run each seed (default: the seeds the source published) through `pgolf run` and return the
    comparison lines (also echoed). UserError when the recipe publishes nothing."""
    from pipeline import distributed
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    published = load_published(recipe_name)
    if published is None:
        raise UserError(f"recipe {recipe_name!r} carries no published figures (a `published:` section); "
                        "reproduce needs a recipe of a published entry, e.g. sidecar48 or depth_recurrent.")
    seeds = list(seeds) if seeds else published.seeds
    info = distributed.init(device)
    reports = {}
    for seed in seeds:
        r = load_recipe(recipe_name, overrides, seed)
        ddir = Path(data_dir) if data_dir else (Path(r.data.dir) if r.data.dir else embedded(r.model.vocab_size))
        reports[seed] = run_recipe(r, ddir, out_root, info, echo=echo, progress_factory=progress_factory)
    lines = comparison_lines(published, reports)
    if info.is_main:
        for line in lines:
            echo(line)
    return lines
