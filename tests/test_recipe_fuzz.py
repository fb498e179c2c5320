"""No traceback for a user error, anywhere: hostile values for every recipe key and for the
CLI's options either load cleanly or fail at load with exit code 2 and one error message.

- `test_every_key_takes_hostile_values_cleanly`: every key of the Recipe schema (leaves, whole
  sections, whole rule lists) x a fixed set of hostile values, through `load_recipe`; a value
  that loads must also build the model (on the meta device).
- `test_check_with_any_value_for_any_key`: hypothesis draws a key and a value (wrong types,
  0, negatives, huge numbers, nan/inf, empty and odd strings, lists, mappings, YAML oddities)
  and runs `pgolf check tiny --set key=value` through the real CLI entry point in-process.
- `test_check_with_any_cli_options`: the same for the recipe argument, `--seed` and the
  syntax of `--set` itself.

Deterministic (derandomize=True), ~20-40 s in all.

    .venv/bin/python -m pytest -q tests/test_recipe_fuzz.py
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import cli_inprocess

from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.recipe import load_recipe, recipe_schema


def schema_keys(cls=None, prefix: tuple = ()) -> list[str]:
    """Every settable dotted key: leaves, sections (also Optional ones) and lists of rules whole,
    the model parts' own settings included (the recipe schema is built from the registry)."""
    cls = recipe_schema() if cls is None else cls
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        keys.append(".".join(path))
        tp = hints[f.name]
        union = typing.get_origin(tp) is typing.Union
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            keys += schema_keys(inner[0], path)
    return keys


KEYS = schema_keys()

# Hostile --set texts: wrong types, zero, negatives, huge, non-finite, empty, odd strings,
# YAML quirks (1.1 booleans, octal, sexagesimal, dates, tags, anchors), broken syntax.
ODD = [
    "0", "-1", "1", "2", "-0.5", "0.5", "1e-9", "1e6", "1e400", "-1e400", "nan", ".nan", "inf", "-.inf",
    str(2**31), str(2**63), str(2**64), str(-(2**63) - 1), "9" * 400, "", " ", "null", "~", "true", "false",
    "on", "off", "yes", "no", "[]", "{}", "[1, 2]", "[0]", "[-1]", "[3, 3]", "{a: 1}", "[{scheme: int8}]",
    "[{scheme: fp16, pattern: '(('}]", "[{pattern: mlp, scale: nan}]", "[{name: x, rules: []}]",
    "'quoted'", '"', "'", "[", "{", "]", ":", "- a", "a: b", "&a [*a]", "!!binary aGk=", "!!set {a}",
    "!!timestamp 2026-01-01", "!!float x", "2026-01-01", "0x10", "010", "1_000", "1:30", "=", "a=b",
    "x\x00y", "bad \udcff byte", "\u00e9\u4e2d", "a" * 300, "../..", "causal", "orthogonal", "elita",
    "depth_recurrent", "sliding", "zlib", ".*", "((",
]
VALUES = st.one_of(
    st.sampled_from(ODD),
    st.integers(-3, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 5), st.text(max_size=4), st.booleans(), st.none()), max_size=3).map(json.dumps),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-3, 5), st.text(max_size=4)),
                    max_size=2).map(json.dumps),
)

# Each example runs the CLI (seconds when a value is accepted): no deadline, no too-slow check.
FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


def assert_clean(proc, flag: str | None = None) -> None:
    """Exit 0, or exit 2 with exactly one error message (ours or click's usage error) and no
    traceback; with `flag`, an error must name it (it failed at load, not later)."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    if proc.returncode == 0:
        return
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if re.match(r"(error|Error): ", line)]
    assert len(errors) == 1, proc.stderr[-3000:]
    if flag is not None:
        assert flag in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_schema_keys_cover_nested_sections_and_rule_lists():
    for key in ("model.rope.dims", "model.bigram.buckets", "model.sidecar.layers", "train.coprime.alpha_end",
                "quant.rules", "quant.compare", "optim.grad_conditioning.rules", "optim.grad_conditioning.mode"):
        assert key in KEYS
    assert len(KEYS) > 150


@pytest.mark.parametrize("value", ["0", "-1", "1e400", "nan", "", "{}", "x"])
def test_every_key_takes_hostile_values_cleanly(value):
    for key in KEYS:
        try:
            recipe = load_recipe("tiny", [f"{key}={value}"])
        except UserError as e:
            assert str(e).startswith((f"--set {key}={value}: ", "2 problem(s):\n", "3 problem(s):\n")), str(e)
            assert f"--set {key}={value}" in str(e)
            continue
        if key.startswith("model."):  # accepted: the model it describes must build
            with torch.device("meta"):
                build_model(recipe.model)


@settings(max_examples=40, **FUZZ)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_check_with_any_value_for_any_key(workdir, key, value):
    proc = cli_inprocess("check", "tiny", "--set", f"{key}={value}", cwd=workdir)
    assert_clean(proc, flag=f"--set {key}=")
    if proc.returncode == 0:
        assert re.search(r"^params=\d+$", proc.stdout, re.MULTILINE)


RECIPE_ARGS = st.one_of(st.sampled_from(["tiny", "tiny.yaml", "recipes/tiny.yaml", "tiny.yml", "Tiny", "tinyy", "",
                                         "../tiny", "/", ".", "x" * 300, "x" * 300 + ".yaml", "tiny\x00", "-", "--"]),
                        st.text(max_size=10))
SEEDS = st.one_of(st.integers(-5, 5).map(str),
                  st.sampled_from(["", "x", "1.5", "1e3", str(2**32), str(2**32 - 1), str(2**64), "-0", " 7", "0x10"]),
                  st.text(max_size=6))
ASSIGNMENTS = st.one_of(
    st.sampled_from(["train.max_steps", "=5", ".a=1", "a..b=1", "train.=1", "model.num_layers.x=1", "seed.x=1",
                     "name.x=1", "extends=x", "model=5", "model=[1]", "model.rope=null", "quant.rules.0.scheme=fp16",
                     "train.max_steps==3", " train.max_steps = 3 ", "TRAIN.MAX_STEPS=3", "model.bigram=null",
                     "model.bigram={}", "model.sidecar={layers: [1]}", "ttt=", "data.dir=", "name="]),
    st.text(max_size=16),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=8)))


@settings(max_examples=40, **FUZZ)
@given(recipe=RECIPE_ARGS, seed=st.none() | SEEDS, assignments=st.lists(ASSIGNMENTS, max_size=2))
def test_check_with_any_cli_options(workdir, recipe, seed, assignments):
    args = ["check", recipe]
    if seed is not None:
        args += ["--seed", seed]
    for a in assignments:
        args += ["--set", a]
    assert_clean(cli_inprocess(*args, cwd=workdir))
