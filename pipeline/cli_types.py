"""click parameter types for pgolf's command-line options, so a bad option is refused by the
parser, with the option's name and the fix, before any work starts.

    @click.option("--seeds", type=SEED_LIST, default="1337,42,2025")    # -> [1337, 42, 2025]
    @click.option("--seed", type=SEED, default=None)                    # -> 42
    @click.option("--device", type=DEVICE, default="auto")              # -> "cuda:1"
    @click.option("--out", type=OUTPUT_DIR, default=Path("artifacts"))  # -> Path("artifacts")

Each type's `convert` returns the parsed value or calls `self.fail(...)` (click's BadParameter,
exit code 2, printed without a traceback, naming the option). Seeds share the recipe's range
(`pipeline.config.Recipe.seed`: 0 .. 2^32 - 1), so a seed the parser accepts also loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

import click

from pipeline import config as C

_SEED_RULES = next(f.metadata["constraints"] for f in dataclasses.fields(C.Recipe) if f.name == "seed")
SEED_MIN, SEED_MAX = _SEED_RULES["ge"], _SEED_RULES["le"]


def _seed(text: str) -> int | None:
    """The seed written as `text` (decimal digits, optional underscores), else None."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]+(?:_[0-9]+)*", text):
        return None
    value = int(text.replace("_", ""))
    return value if SEED_MIN <= value <= SEED_MAX else None


class SeedType(click.ParamType):
    """One seed: a whole number in [0, 2^32 - 1] (the recipe's `seed` range)."""

    name = "seed"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            self.fail(f"{value!r} is not a seed; give a whole number from {SEED_MIN} to {SEED_MAX}.", param, ctx)
        seed = _seed(text)
        if seed is None:
            self.fail(f"{text!r} is not a seed; give a whole number from {SEED_MIN} to {SEED_MAX}, e.g. 1337.",
                      param, ctx)
        return seed


class SeedListType(click.ParamType):
    """Comma-separated seeds, e.g. `1337,42,2025` -> [1337, 42, 2025]: at least one, each a
    whole number in [0, 2^32 - 1], none repeated (a repeated seed would count one run twice
    in submit's statistics)."""

    name = "seeds"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            items = [str(v) for v in value]
        elif isinstance(value, str):
            items = value.split(",")
        else:
            self.fail(f"{value!r} is not a list of seeds; write them comma-separated, e.g. 1337,42,2025.", param, ctx)
        if not any(item.strip() for item in items):
            self.fail("no seeds given; write them comma-separated, e.g. 1337,42,2025.", param, ctx)
        seeds: list[int] = []
        for i, item in enumerate(items, 1):
            if not item.strip():
                self.fail(f"{value!r}: seed {i} is empty; remove the extra comma.", param, ctx)
            seed = _seed(item)
            if seed is None:
                self.fail(f"{value!r}: {item.strip()!r} is not a seed; each must be a whole number from "
                          f"{SEED_MIN} to {SEED_MAX}.", param, ctx)
            if seed in seeds:
                self.fail(f"{value!r}: seed {seed} is given twice; each seed must be a separate run.", param, ctx)
            seeds.append(seed)
        return seeds


class DeviceType(click.ParamType):
    """`auto` (CUDA when there is a GPU, else CPU), `cpu`, `cuda` (the local rank's GPU) or
    `cuda:N`. Whether GPU N exists is checked when the run starts, not here."""

    name = "device"
    CHOICES = ("auto", "cpu", "cuda")

    def convert(self, value, param, ctx):
        text = value.strip().lower() if isinstance(value, str) else None
        if text in self.CHOICES:
            return text
        if text is not None and re.fullmatch(r"cuda:[0-9]{1,4}", text):
            return f"cuda:{int(text[5:])}"  # one spelling per GPU: cuda:01 -> cuda:1
        close = difflib.get_close_matches(text, self.CHOICES, n=1) if text else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        self.fail(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index).{hint}", param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in self.CHOICES if c.startswith(incomplete)]


class OutputDirType(click.ParamType):
    """A folder to write into: it may not exist yet (it is created), but neither it nor any
    folder above it may be an existing file, and the nearest existing folder must be writable."""

    name = "directory"

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            path = value
        elif isinstance(value, str) and value.strip():
            path = Path(value)
        else:
            self.fail(f"{value!r} is not a folder path; give one, e.g. artifacts.", param, ctx)
        text = str(path)
        if "\x00" in text:
            self.fail(f"{text!r} contains a NUL character.", param, ctx)
        # 255 bytes is NAME_MAX of the common file systems; longer fails only when it is created.
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.parts):
            self.fail(f"{text!r} has a name longer than 255 bytes; shorten it.", param, ctx)
        try:
            existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
        except StopIteration:  # a relative path none of whose parts exist: under the cwd
            existing = Path(".")
        except (OSError, ValueError) as e:
            self.fail(f"{text!r} is not a usable path ({e}).", param, ctx)
        if not existing.is_dir():
            where = "is" if existing == path else f"is inside {str(existing)!r}, which is"
            self.fail(f"{text!r} {where} an existing file, not a folder; choose another path.", param, ctx)
        if not os.access(existing, os.W_OK | os.X_OK):
            self.fail(f"{text!r}: cannot write into {str(existing)!r} (permission denied); choose another path.",
                      param, ctx)
        return path


SEED = SeedType()
SEED_LIST = SeedListType()
DEVICE = DeviceType()
OUTPUT_DIR = OutputDirType()
