"""Load a recipe YAML strictly into the frozen `pipeline.config.Recipe`, and refuse at load
every value a later stage would fail on, so `pgolf check` catches what `pgolf run` would.

    recipe = load_recipe("sidecar48", overrides=["train.max_steps=20"], seed=42)

- `RECIPE` is a path to a .yaml file, or a name resolved to `recipes/<name>.yaml`.
- `extends: other.yaml` (relative to the file) composes recipes: mappings merge key by key,
  the child wins, lists and scalars are replaced whole.
- YAML is read with the YAML 1.2 core schema (files and `--set` alike): only true/false are
  booleans and `1e6` is a number, so documented values such as `train.compile: on` and
  `optim.matrix_lr: 1e6` mean what they say (PyYAML's YAML 1.1 reads `on` as true and `1e6`
  as a string).
- `--set a.b=c` overrides are parsed for the type of the field they set: a string or choice
  field takes the text as written, a float field any Python float literal; sections, lists and
  the rest are YAML. They are applied after composition.
- Where things live: reading files and `extends:` in pipeline.recipe_files; the problems (the
  Problem record, raw-value, registry and cross-field rules) in pipeline.recipe_rules; the schema,
  `--set` parsing, field constraints and the loader here.
- Checks, all reported at once, each naming where the bad value came from (the `--set` or
  `--seed` flag, else the recipe file) and its dotted path: the schema (unknown keys and choices
  get a did-you-mean; types are strict: "3" is not an int, 1 is not a bool), the constraints
  each field declares in `pipeline.config` or in its part's settings (`constrained(...)`: ranges,
  lengths, regular expressions; every float finite), registry part and quantization scheme names,
  the keys the recipe's trunk does not implement (refused, never ignored), and the cross-field
  rules: `cross_field_problems` for the pipeline's own, each chosen part's `check=` for its.
- The `model:` schema is built from the model registry (`recipe_schema`): ModelConfig's own
  fields plus every setting a part declared (pipeline.model.registry.settings), so a new part's
  keys are validated, constrained and did-you-meant without being listed here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline import config as C
from pipeline.errors import UserError
from pipeline.recipe_files import RECIPES_DIR, compose, load_yaml, resolve_recipe_path
from pipeline.recipe_rules import (SHOW, Problem, TooLarge, cross_field_problems, dotted, json_problems,
                                   registry_problems, scheme_problems, show, without)

__all__ = ["RECIPES_DIR", "load_recipe", "parse_set_value", "recipe_schema", "resolve_recipe_path",
           "validate"]

_STRICT = ConfigDict(extra="forbid", strict=True)


def _strict(tp, seen: set) -> None:
    """A strict, closed pydantic schema on every dataclass reachable from `tp` (they stay plain
    stdlib dataclasses)."""
    tp = _unwrap(tp)
    if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)) or tp in seen:
        return
    seen.add(tp)
    tp.__pydantic_config__ = _STRICT
    for hint in _hints(tp).values():
        _strict(hint, seen)


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


@functools.cache
def _schema_of(version: int) -> tuple[type, TypeAdapter]:
    from pipeline.model import registry

    specs = registry.setting_specs()
    hints = _hints(C.ModelConfig)
    model_fields = [(f.name, hints[f.name], _copy_field(f)) for f in dataclasses.fields(C.ModelConfig)
                    if f.name != "settings"]
    model_fields += [(key, s.type, _copy_field(s.field)) for key, s in specs.items()]
    model = dataclasses.make_dataclass("model", model_fields, frozen=True)
    recipe_hints = _hints(C.Recipe)
    recipe = dataclasses.make_dataclass(
        "Recipe", [(f.name, model if f.name == "model" else recipe_hints[f.name], _copy_field(f))
                   for f in dataclasses.fields(C.Recipe)], frozen=True)
    _strict(recipe, set())
    return recipe, TypeAdapter(recipe)


def _registry_version() -> int:
    from pipeline.model import registry

    return registry.version()


def recipe_schema() -> type:
    """The recipe's schema: `pipeline.config.Recipe` whose `model` is ModelConfig's fields plus every
    registered part setting, as one closed dataclass (rebuilt when the registry changes)."""
    from pipeline.model import registry

    registry.setting_specs()  # load the parts first: their settings are part of the schema
    return _schema_of(registry.version())[0]


def _to_recipe(validated) -> C.Recipe:
    """The frozen Recipe for a value of `recipe_schema()`."""
    from pipeline.model import registry

    values = {f.name: getattr(validated, f.name) for f in dataclasses.fields(C.Recipe)}
    m = values["model"]
    core = {f.name: getattr(m, f.name) for f in dataclasses.fields(C.ModelConfig) if f.name != "settings"}
    values["model"] = C.ModelConfig(**core, settings={k: getattr(m, k) for k in registry.setting_specs()})
    return C.Recipe(**values)


INT64 = (-(2**63), 2**63 - 1)


# ----------------------------------------------------------------------------- --set


@dataclass(frozen=True)
class _Flag:
    """A command-line setting: the flag as typed and the dotted path it sets."""

    text: str  # "--set a.b=c" or "--seed 5" (long values shortened)
    path: tuple[str, ...]


class _BadValue(Exception):
    """A `--set` value that cannot be read for its field."""


def _field_type(parts: Iterable[str]):
    """The annotation of the Recipe field at `parts`, or None if there is no such field."""
    tp: Any = recipe_schema()
    for part in parts:
        base = _strip_optional(tp)[0]
        if not (dataclasses.is_dataclass(base) and part in {f.name for f in dataclasses.fields(base)}):
            return None
        tp = _hints(base)[part]
    return tp


@functools.cache
def _hints(cls) -> dict[str, Any]:
    # Resolving the string annotations (`from __future__ import annotations`) is slow: once per class.
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    """(X, True) for Optional[X], else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_text(tp) -> bool:
    """str, or a Literal of strings (a choice)."""
    if tp is str:
        return True
    return typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(tp))


def parse_set_value(raw: str, tp) -> Any:
    """The value `--set key=RAW` gives a field annotated `tp` (None: no such field).

    A string or choice field takes RAW as written (`train.compile=on` is "on", not true), unless
    it is quoted; a float field takes any float literal (`1e6`, `1E-3`, `.5`; an int becomes a
    float); everything else, ints, booleans, lists and sections, is read as YAML (core schema).
    Optional fields take null or ~ as None."""
    base, optional = _strip_optional(tp)
    text = raw.strip()
    if optional and text in ("null", "~", "Null", "NULL"):
        return None
    if _is_text(base):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                value = load_yaml(text)
            except yaml.YAMLError:
                return raw
            if isinstance(value, str):
                return value
        return text if base is not str else raw
    if base is float:
        try:
            return float(text)  # Python's float literals: 1e6, 1E-3, .5, 1_000.5, inf, nan
        except ValueError:
            pass  # not a number: read as YAML, and the schema names what it got
    return _yaml(raw)


def _yaml(raw: str):
    try:
        return load_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise _BadValue(f"not valid YAML ({problem}); quote it or fix the syntax") from None


def _parse_assignment(assignment: str) -> tuple[tuple[str, ...], str]:
    if not isinstance(assignment, str) or "=" not in assignment:
        raise UserError(f"--set {show(assignment)}: expected dotted.key=value, e.g. train.max_steps=100.")
    key, raw = assignment.split("=", 1)
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise UserError(f"--set {show(assignment)}: empty key segment in {key!r}; write e.g. train.max_steps=100.")
    return parts, raw


def _set_in(data: dict, parts: tuple[str, ...], value, flag: str) -> tuple[str, ...]:
    """Set data[parts] = value, creating sections on the way. Returns what the flag is answerable
    for: the outermost section it created (its other keys take their defaults because of the
    flag: `--set model.sidecar.hidden=8` switches the sidecar on), else `parts`."""
    node, owned = data, parts
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
            owned = parts[:i + 1] if owned == parts else owned
        elif not isinstance(nxt, dict):
            raise UserError(f"{flag}: {'.'.join(parts[:i + 1])} is not a section, so it has no key "
                            f"{parts[i + 1]!r}; set {'.'.join(parts[:i + 1])} itself.")
        node = nxt
    node[parts[-1]] = value
    return owned


def _flag_text(flag: str, value) -> str:
    text = str(value)
    return f"{flag} {text if len(text) <= 2 * SHOW else text[:2 * SHOW] + '...'}"


# ----------------------------------------------------------------------------- messages



def _blame(problem: Problem, flags: list[_Flag], source: str) -> str:
    """Where the bad value came from: the last flag that set (a part of) each location, else the file."""
    names: list[str] = []
    for loc in problem.locs:
        loc = tuple(str(p) for p in loc)
        related = [f.text for f in flags if loc and (loc[:len(f.path)] == f.path or f.path[:len(loc)] == loc)]
        if related and related[-1] not in names:
            names.append(related[-1])
    return ", ".join(names) or source


def _dataclass_at(loc: tuple) -> type | None:
    """The dataclass type found by walking field names in `loc` from the recipe schema."""
    tp: Any = recipe_schema()
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            continue
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = _hints(tp)[part]
    tp = _unwrap(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def _unwrap(tp):
    """Optional[X] -> X; tuple[X, ...] -> X."""
    tp = _strip_optional(tp)[0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args:
        return _unwrap(args[0])
    return tp


_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _format_error(err: dict) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "json-"))))
    # pydantic adds union-branch / dataclass tags to locations; keep only real field names.
    clean = tuple(p for p in loc if isinstance(p, int) or not any(ch in p for ch in "[]()"))
    path = dotted(clean)
    kind, msg, given = err["type"], err["msg"], err.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = _dataclass_at(clean[:-1])
        known = [f.name for f in dataclasses.fields(parent)] if parent else []
        close = difflib.get_close_matches(str(clean[-1]), known, n=1)
        hint = f" Did you mean {'.'.join(map(str, (*clean[:-1], close[0])))!r}?" if close else ""
        return Problem((clean,), f"{path}: unknown key.{hint}")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(given), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return Problem((clean,), f"{path}: {show(given)} is not one of {expected}.{hint}")
    if kind == "missing":
        return Problem((clean,), f"{path}: required key is missing.")
    hint = " (write true or false)" if kind == "bool_type" and str(given).lower() in _BOOL_WORDS else ""
    return Problem((clean,), f"{path}: {msg} (got {show(given)}){hint}.")


# ----------------------------------------------------------------------------- field constraints


def _interval(rules: dict) -> str:
    lo = ("[", rules["ge"]) if "ge" in rules else ("(", rules["gt"]) if "gt" in rules else None
    hi = (rules["le"], "]") if "le" in rules else (rules["lt"], ")") if "lt" in rules else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"


def _scalar_problems(value, rules: dict, is_float: bool) -> list[str]:
    """What is wrong with one scalar `value` of a field with `rules` (messages without the path)."""
    if isinstance(value, bool) or value is None:
        return []
    given = show(value)
    if isinstance(value, int) and is_float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
    if isinstance(value, float) and not math.isfinite(value):
        return [f"must be a finite number (got {given})"]
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        return [f"must fit in 64 bits, between {INT64[0]} and {INT64[1]} (got {given})"]
    if isinstance(value, (int, float)):
        bounds = {k: rules[k] for k in ("ge", "gt", "le", "lt") if k in rules}
        ok = (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
              and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf))
        return [] if ok else [f"must be {_interval(bounds)} (got {given})"]
    if isinstance(value, str):
        out = []
        if len(value) < rules.get("min_len", 0):
            out.append(f"must not be empty (got {show(value)})" if rules["min_len"] == 1
                       else f"needs at least {rules['min_len']} characters (got {show(value)})")
        if rules.get("regex"):
            try:
                re.compile(value)
            except (re.error, RecursionError, OverflowError) as e:
                out.append(f"{show(value)} is not a valid regular expression ({e}); fix the pattern")
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            out.append(f"{show(value)} is not allowed")
        return out
    return []


def _constraint_problems(data: dict, cls, loc: tuple = ()) -> list[Problem]:
    """The declared constraints of every field present in the raw mapping `data`, read as
    dataclass `cls`. Values of the wrong kind are left to the schema, which names them; fields
    left out keep their defaults, which satisfy the constraints (a test checks that)."""
    out: list[Problem] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, here, rules = data[f.name], (*loc, f.name), dict(f.metadata.get("constraints", {}))
        why = rules.pop("why", None)
        tp = _strip_optional(hints[f.name])[0]
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        msgs: list[tuple[tuple, str]] = []
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out += _constraint_problems(value, tp, here)
        elif item_tp is not None and isinstance(value, list):
            if len(value) < rules.get("min_len", 0):
                msgs.append((here, f"needs at least {rules['min_len']} item(s) (got {show(value)})"))
            if rules.get("unique") and all(isinstance(v, (int, float, str)) for v in value) \
                    and len(set(value)) != len(value):
                msgs.append((here, f"items must not repeat (got {show(value)})"))
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item_tp) and isinstance(item, dict):
                    out += _constraint_problems(item, item_tp, (*here, i))
                elif _kind_ok(item, item_tp):
                    msgs += [((*here, i), m) for m in _scalar_problems(item, rules, item_tp is float)]
        elif _kind_ok(value, tp):
            msgs += [(here, m) for m in _scalar_problems(value, rules, tp is float)]
        for where, m in msgs:
            out.append(Problem((where,), f"{dotted(where)}: {m}{f'; {why}' if why else ''}."))
    return out


def _kind_ok(value, tp) -> bool:
    """Whether `value` is of the kind the schema accepts for `tp` (so its constraints apply)."""
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if _is_text(tp):
        return isinstance(value, str)
    return False


# ----------------------------------------------------------------------------- validation


def validate(data: dict, source: str, flags: list[_Flag] | None = None,
             problems: list[Problem] | None = None) -> C.Recipe:
    """The Recipe for the raw mapping `data`, or one UserError listing every problem, each
    blamed on the flag in `flags` that set it, else on `source` (the recipe file)."""
    flags, problems = list(flags or []), list(problems or [])
    try:
        raw = json_problems(data, ())
    except TooLarge as e:  # nothing else can be checked in reasonable time
        _raise([*problems, e.args[0]], flags, source)
    problems += raw
    clean = without(data, {p.locs[0] for p in raw})
    named, refused = registry_problems(clean)
    problems += named
    clean = without(clean, refused)  # a refused key is reported once, by its refusal
    schema, adapter = recipe_schema(), _schema_of(_registry_version())[1]
    recipe = None
    try:
        # JSON mode: strict scalars ("3" is no int, 1 is no bool) while mappings and lists
        # still validate into the frozen dataclasses and tuples.
        recipe = _to_recipe(adapter.validate_json(json.dumps(clean)))
    except ValidationError as e:
        problems += [_format_error(err) for err in e.errors()]
    except RecursionError:
        problems.append(Problem(((),), "the recipe is nested too deeply."))
    problems += scheme_problems(clean)
    fields = _constraint_problems(clean, schema)
    problems += fields
    if recipe is not None:
        bad = {dotted(loc) for p in [*fields, *named] for loc in p.locs}
        problems += cross_field_problems(recipe, bad)
    if problems:
        _raise(problems, flags, source)
    return recipe


def _raise(problems: list[Problem], flags: list[_Flag], source: str) -> typing.NoReturn:
    """One UserError: a single problem on one line, several under a count."""
    lines = list(dict.fromkeys(f"{_blame(p, flags, source)}: {p.text}" for p in problems))
    if len(lines) == 1:
        raise UserError(lines[0])
    raise UserError(f"{len(lines)} problem(s):\n  " + "\n  ".join(lines))


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), seed: int | None = None) -> C.Recipe:
    path = resolve_recipe_path(recipe)
    data = compose(path)
    # A reproduced entry's published figures are for `pgolf reproduce` (pipeline.reproduce), not
    # part of the run's settings.
    data.pop("published", None)
    data.setdefault("name", path.stem)
    flags: list[_Flag] = []
    problems: list[Problem] = []
    for assignment in overrides:
        parts, raw = _parse_assignment(assignment)
        text = _flag_text("--set", assignment)
        try:
            value = parse_set_value(raw, _field_type(parts))
        except _BadValue as e:
            problems.append(Problem((parts,), f"{'.'.join(parts)}: {e}."))
            flags.append(_Flag(text, parts))
            continue
        flags.append(_Flag(text, _set_in(data, parts, value, text)))
    if seed is not None:
        data["seed"] = seed
        flags.append(_Flag(_flag_text("--seed", seed), ("seed",)))
    return validate(data, str(path), flags, problems)
