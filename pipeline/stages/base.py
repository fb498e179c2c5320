"""What a stage is, and what every stage runs in.

A `Stage` has a name, the slice of the recipe it depends on, the data it reads, and
`run(ctx) -> outputs` (a JSON-able dict). `pipeline.stages.sequence.STAGES` lists them in order;
`pgolf run` loops over that list with content-keyed caching (`pipeline.run`), and the shipped
`train_gpt.py` loops over the same list without caching (`pipeline.script_entry`). There is no
second orchestrator: the two differ only in the `Context` they pass (where files go, whether
training checkpoints, how lines are logged).

Runtime-pure (bundled into the submission script): stdlib, torch and pipeline only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.config import Recipe
from pipeline.distributed import DistInfo


@dataclass(frozen=True)
class Stage:
    name: str
    # The slice of the run's settings this stage's outputs depend on (part of its cache key).
    depends_on: Callable[["Context"], dict]
    # The data identities it reads: any of "train", "val", "tokenizer" (part of its cache key).
    data_inputs: tuple[str, ...]
    # Names of the files it writes through ctx.path(name, file); each is hashed in its manifest.
    files: tuple[str, ...]
    run: Callable[["Context"], dict]
    # False for a stage that is cheap and must always reflect the current run (the report).
    cached: bool = True


@dataclass
class Context:
    """Everything a stage may use. Built once per run by `pgolf run` or by `train_gpt.py`."""

    recipe: Recipe
    dist: DistInfo
    data: Any  # pipeline.stages.evaluate.Data
    log: Callable[[str], None]
    code_bytes: int  # bytes of the shipped train_gpt.py, counted against the cap
    path: Callable[[str, str], Path]  # (stage name, file name) -> where that file lives
    # Training checkpoints: where they live (None = none written, none resumed, as in the
    # shipped script) and what a checkpoint must have been written under to be resumed.
    checkpoint_dir: Optional[Path] = None
    checkpoint_key: dict = field(default_factory=dict)
    progress_factory: Optional[Callable[[int], Any]] = None
    # Called with (recipe, dist, log) before training starts, to refuse a run that cannot fit in
    # memory (pipeline.preflight; pgolf's side only, the shipped script does not carry it).
    preflight: Optional[Callable] = None
    outputs: dict = field(default_factory=dict)  # each finished stage's outputs, by stage name
    started: float = field(default_factory=time.perf_counter)
    # What produced this run (content hashes of data and code), recorded in the report; the
    # shipped script fills in what it can compute cheaply.
    provenance: dict = field(default_factory=dict)


class Logger:
    """Rank-0 log lines to the console (`echo`) and, when given, appended to a log file. A run
    that cannot be a legal entry carries its tag on every line (DESIGN.md §5)."""

    def __init__(self, echo: Callable[[str], None], tag: str = "", path: Optional[Path] = None, enabled: bool = True):
        self.echo, self.tag, self.path, self.enabled = echo, tag, path, enabled
        if enabled and path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tag:
            line = f"{line} {self.tag}"
        self.echo(line)
        self.to_file(line)

    def to_file(self, line: str) -> None:
        """`line` to the log file only (what the console already shows another way, e.g. the CLI's error)."""
        if self.enabled and self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def run_stages(stages, ctx: Context) -> dict:
    """Run every stage in order with no caching (the shipped script's loop); returns ctx.outputs."""
    for stage in stages:
        ctx.outputs[stage.name] = stage.run(ctx)
    return ctx.outputs
