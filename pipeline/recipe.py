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
- Checks, all reported at once, each naming where the bad value came from (the `--set` or
  `--seed` flag, else the recipe file) and its dotted path: the schema (unknown keys and choices
  get a did-you-mean; types are strict: "3" is not an int, 1 is not a bool), the constraints
  each field declares in `pipeline.config` or in its part's settings (`constrained(...)`: ranges,
  lengths, regular expressions; every float finite), registry part and quantization scheme names,
  the keys the recipe's trunk does not implement (refused, never ignored), and the cross-field
  rules: `_cross_field_problems` for the pipeline's own, each chosen part's `check=` for its.
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

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

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
_SHOW = 60  # longest value shown in a message


# ----------------------------------------------------------------------------- YAML


class _CoreLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's SafeLoader (libyaml's parser where installed: ~10x faster, and it caps nesting
    depth) with the YAML 1.2 core schema's plain scalars: booleans are only true/false, null
    only null/~/empty, ints are decimal (underscores allowed), floats include 1e6, .5, .inf and
    .nan. No implicit timestamps (they are not JSON values either)."""


_REPLACED = {f"tag:yaml.org,2002:{t}" for t in ("bool", "null", "int", "float", "timestamp", "value")}
_CoreLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in _REPLACED]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# Regular expressions from the YAML 1.2.2 spec, §10.3.2 "Tag Resolution" (core schema).
for _tag, _rx, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("int", r"^[-+]?[0-9]+(?:_[0-9]+)*$", "-+0123456789"),
        ("float", (r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
                   r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), "-+.0123456789")):
    _CoreLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_rx), list(_first))


def _construct_int(loader, node):
    # Decimal only: SafeLoader reads a leading 0 as octal ("010" -> 8) and "09" raises ValueError.
    text = loader.construct_scalar(node)
    try:
        return int(text.replace("_", ""), 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a decimal integer",
                                                node.start_mark) from None


def _construct_float(loader, node):
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_float(loader, node)
    except ValueError:  # an explicit `!!float abc`
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a number",
                                                node.start_mark) from None


_CoreLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_CoreLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _load_yaml(text: str):
    """YAML text -> value (core schema). Raises yaml.YAMLError for anything it cannot read."""
    try:
        return yaml.load(text, Loader=_CoreLoader)  # a SafeLoader subclass: no arbitrary objects
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except (ValueError, TypeError) as e:  # constructors of explicit tags (!!timestamp x, ...)
        raise yaml.YAMLError(str(e)) from None


# ----------------------------------------------------------------------------- files


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, say
        return False


def resolve_recipe_path(recipe: str | Path) -> Path:
    text = str(recipe)
    if not text or "\x00" in text:
        raise UserError(f"recipe {text!r} is not a recipe name or a path to a .yaml file.")
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not _is_file(p):
            raise UserError(f"recipe file {_show(str(p))} does not exist.")
        return p
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if re.fullmatch(r"[A-Za-z0-9_.+-]+", text) and _is_file(candidate):
        return candidate
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(text, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown recipe {_show(text)}.{hint} Known recipes: {', '.join(known)} "
                    f"(or pass a path to a .yaml file).")


def _read_yaml(path: Path) -> dict:
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"malformed YAML in {where}: {e.problem}. Fix the syntax there.") from None
    except yaml.YAMLError as e:
        raise UserError(f"malformed YAML in {path}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror or e}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}.")
    return data


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p.name) for p in (*seen, path))
        raise UserError(f"recipe extends itself in a cycle: {chain}.")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent or "\x00" in parent:
        raise UserError(f"{path}: 'extends' must be a file name, got {_show(parent)}.")
    parent_path = (path.parent / parent)
    if not _is_file(parent_path):
        raise UserError(f"{path}: extends {parent!r}, which does not exist next to it.")
    return _merge(_compose(parent_path, (*seen, path)), data)


# ----------------------------------------------------------------------------- --set


@dataclass(frozen=True)
class _Flag:
    """A command-line setting: the flag as typed and the dotted path it sets."""

    text: str  # "--set a.b=c" or "--seed 5" (long values shortened)
    path: tuple[str, ...]


@dataclass(frozen=True)
class _Problem:
    locs: tuple[tuple, ...]  # the dotted locations it concerns (a flag setting one gets the blame)
    text: str  # "path: what is wrong. The fix."


class _BadValue(Exception):
    """A `--set` value that cannot be read for its field."""


class _TooLarge(Exception):
    """A raw value too large to validate (YAML aliases can expand a few lines without bound)."""


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
                value = _load_yaml(text)
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
        return _load_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise _BadValue(f"not valid YAML ({problem}); quote it or fix the syntax") from None


def _parse_assignment(assignment: str) -> tuple[tuple[str, ...], str]:
    if not isinstance(assignment, str) or "=" not in assignment:
        raise UserError(f"--set {_show(assignment)}: expected dotted.key=value, e.g. train.max_steps=100.")
    key, raw = assignment.split("=", 1)
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise UserError(f"--set {_show(assignment)}: empty key segment in {key!r}; write e.g. train.max_steps=100.")
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
    return f"{flag} {text if len(text) <= 2 * _SHOW else text[:2 * _SHOW] + '...'}"


# ----------------------------------------------------------------------------- messages


def _show(value) -> str:
    """repr(value), shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW - 3] + "..."


def _dotted(loc: Iterable) -> str:
    return ".".join(str(p) for p in loc) or "<recipe>"


def _problem(locs: Iterable[str], text: str) -> _Problem:
    """A problem about the dotted paths `locs` (e.g. "train.seq_len")."""
    return _Problem(tuple(tuple(loc.split(".")) for loc in locs), text)


def _blame(problem: _Problem, flags: list[_Flag], source: str) -> str:
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


def _format_error(err: dict) -> _Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "json-"))))
    # pydantic adds union-branch / dataclass tags to locations; keep only real field names.
    clean = tuple(p for p in loc if isinstance(p, int) or not any(ch in p for ch in "[]()"))
    path = _dotted(clean)
    kind, msg, given = err["type"], err["msg"], err.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = _dataclass_at(clean[:-1])
        known = [f.name for f in dataclasses.fields(parent)] if parent else []
        close = difflib.get_close_matches(str(clean[-1]), known, n=1)
        hint = f" Did you mean {'.'.join(map(str, (*clean[:-1], close[0])))!r}?" if close else ""
        return _Problem((clean,), f"{path}: unknown key.{hint}")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(given), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return _Problem((clean,), f"{path}: {_show(given)} is not one of {expected}.{hint}")
    if kind == "missing":
        return _Problem((clean,), f"{path}: required key is missing.")
    hint = " (write true or false)" if kind == "bool_type" and str(given).lower() in _BOOL_WORDS else ""
    return _Problem((clean,), f"{path}: {msg} (got {_show(given)}){hint}.")


# ----------------------------------------------------------------------------- raw values


_MAX_NODES = 100_000  # far above any recipe; YAML aliases can make a few lines expand without bound


def _json_problems(value, loc: tuple, path_ids: tuple = (), budget: list | None = None) -> list[_Problem]:
    """Values the schema cannot even be asked about: not JSON (an explicit YAML tag such as
    !!binary or !!set), text with a NUL or an unpaired surrogate (not UTF-8), non-string keys,
    and YAML aliases that make a value contain itself or expand past _MAX_NODES."""
    budget = [_MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(_Problem((loc,), f"{_dotted(loc)}: the value is too large (over {_MAX_NODES} items)."))
    if isinstance(value, (dict, list)):
        if id(value) in path_ids:
            return [_Problem((loc,), f"{_dotted(loc)}: the value contains itself (a YAML alias to its own anchor).")]
        path_ids = (*path_ids, id(value))
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if not isinstance(k, str):
                out.append(_Problem(((*loc, str(k)),), f"{_dotted((*loc, k))}: keys must be names, got {_show(k)}."))
            else:
                out += _json_problems(v, (*loc, k), path_ids, budget)
        return out
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _json_problems(v, (*loc, i), path_ids, budget)]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [_Problem((loc,), f"{_dotted(loc)}: {_show(value)} is not valid UTF-8 text.")]
        if "\x00" in value:
            return [_Problem((loc,), f"{_dotted(loc)}: {_show(value)} contains a NUL character.")]
        return []
    if value is None or isinstance(value, (bool, int, float)):
        return []
    return [_Problem((loc,), f"{_dotted(loc)}: a YAML {type(value).__name__} value ({_show(value)}) is not a "
                             f"recipe value; write a number, a string, true/false, a list or a mapping.")]


def _without(value, bad: set[tuple]):
    """A copy of `value` without the entries at the locations in `bad` (so it dumps as JSON)."""
    def walk(v, loc):
        if isinstance(v, dict):
            return {k: walk(x, (*loc, k)) for k, x in v.items() if isinstance(k, str) and (*loc, k) not in bad}
        if isinstance(v, list):
            return [walk(x, (*loc, i)) for i, x in enumerate(v) if (*loc, i) not in bad]
        return v
    return walk(value, ())


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
    given = _show(value)
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
            out.append(f"must not be empty (got {_show(value)})" if rules["min_len"] == 1
                       else f"needs at least {rules['min_len']} characters (got {_show(value)})")
        if rules.get("regex"):
            try:
                re.compile(value)
            except (re.error, RecursionError, OverflowError) as e:
                out.append(f"{_show(value)} is not a valid regular expression ({e}); fix the pattern")
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            out.append(f"{_show(value)} is not allowed")
        return out
    return []


def _constraint_problems(data: dict, cls, loc: tuple = ()) -> list[_Problem]:
    """The declared constraints of every field present in the raw mapping `data`, read as
    dataclass `cls`. Values of the wrong kind are left to the schema, which names them; fields
    left out keep their defaults, which satisfy the constraints (a test checks that)."""
    out: list[_Problem] = []
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
                msgs.append((here, f"needs at least {rules['min_len']} item(s) (got {_show(value)})"))
            if rules.get("unique") and all(isinstance(v, (int, float, str)) for v in value) \
                    and len(set(value)) != len(value):
                msgs.append((here, f"items must not repeat (got {_show(value)})"))
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item_tp) and isinstance(item, dict):
                    out += _constraint_problems(item, item_tp, (*here, i))
                elif _kind_ok(item, item_tp):
                    msgs += [((*here, i), m) for m in _scalar_problems(item, rules, item_tp is float)]
        elif _kind_ok(value, tp):
            msgs += [(here, m) for m in _scalar_problems(value, rules, tp is float)]
        for where, m in msgs:
            out.append(_Problem((where,), f"{_dotted(where)}: {m}{f'; {why}' if why else ''}."))
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


# ----------------------------------------------------------------------------- cross-field rules


def _registry_problems(data: dict) -> tuple[list[_Problem], set[tuple]]:
    """Part names resolved by the model registry (its message carries a did-you-mean), and the
    `model:` keys the recipe's trunk does not implement: (problems, locations of refused keys)."""
    from pipeline.model import compose, registry

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    defaults = C.ModelConfig.__dataclass_fields__
    out: list[_Problem] = []
    trunk_name = model.get("trunk", defaults["trunk"].default)
    trunk = None
    if isinstance(trunk_name, str):
        try:
            trunk = registry.part("trunk", trunk_name)
        except UserError as e:
            out.append(_problem(["model.trunk"], str(e)))
    refused = compose.refusals(trunk.name, model) if trunk is not None else {}
    out += [_problem([f"model.{key}"], text) for key, text in refused.items()]
    kinds = trunk.kinds if trunk is not None else tuple(registry.SLOT_FIELDS)
    for kind in kinds:
        field_name = registry.SLOT_FIELDS[kind]
        value = model.get(field_name, defaults[field_name].default)
        if isinstance(value, str) and value != registry.NO_PART.get(kind):
            try:
                registry.part(kind, value)
            except UserError as e:
                out.append(_problem([f"model.{field_name}"], str(e)))
    return out, {("model", key) for key in refused}


def _scheme_problems(data: dict) -> list[_Problem]:
    """Quantization scheme and role names of every rule list (the codec's scheme registry and
    pipeline.model.roles), with a did-you-mean."""
    from pipeline.export.codec import selectable_schemes
    from pipeline.model.roles import ROLES

    quant = data.get("quant") if isinstance(data.get("quant"), dict) else {}
    lists = [("quant.rules", quant.get("rules"))]
    compare = quant.get("compare") if isinstance(quant.get("compare"), list) else []
    lists += [(f"quant.compare.{i}.rules", c.get("rules")) for i, c in enumerate(compare) if isinstance(c, dict)]
    schemes = selectable_schemes()
    out = []
    for where, rules in lists:
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, dict):
                continue
            scheme = rule.get("scheme")
            if isinstance(scheme, str) and scheme not in schemes:
                close = difflib.get_close_matches(scheme, schemes, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                out.append(_problem([f"{where}.{i}.scheme"], f"{where}.{i}.scheme: {_show(scheme)} is not a "
                                    f"quantization scheme; one of {', '.join(schemes)}.{hint}"))
            roles = rule.get("roles")
            for j, role in enumerate(roles if isinstance(roles, list) else []):
                if isinstance(role, str) and role not in ROLES:
                    close = difflib.get_close_matches(role, ROLES, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    out.append(_problem([f"{where}.{i}.roles.{j}"], f"{where}.{i}.roles.{j}: {_show(role)} is not "
                                        f"a parameter role; one of {', '.join(ROLES)}.{hint}"))
    return out


def _cross_field_problems(r: C.Recipe, bad: set[str]) -> list[_Problem]:
    """Rules that involve more than one field, on a recipe whose schema validated. A rule is
    skipped while a field it reads breaks its own constraint (that one is reported instead)."""
    out: list[_Problem] = []

    def ok(*paths: str) -> bool:
        return not any(b == p or b.startswith(p + ".") for b in bad for p in paths)

    def add(paths: list[str], text: str) -> None:
        out.append(_problem(paths, text))

    m, t, e, ttt = r.model, r.train, r.eval, r.ttt

    # Training batches: each of the reference ranks gets whole sequences every micro-step
    # (pipeline/stages/train.py splits batch_tokens over reference_world_size, then seq_len).
    bt, sl, ref = "train.batch_tokens", "train.seq_len", "train.reference_world_size"
    if ok(bt, sl, ref):
        unit = t.seq_len * t.reference_world_size
        if t.batch_tokens % unit:
            add([bt, sl, ref], f"{bt} ({t.batch_tokens}) must be a multiple of {sl} ({t.seq_len}) x {ref} "
                               f"({t.reference_world_size}) = {unit}, so every reference rank gets whole sequences.")
        elif t.micro_batch_seqs and ok("train.micro_batch_seqs") \
                and (t.batch_tokens // unit) % t.micro_batch_seqs:
            per_rank = t.batch_tokens // unit
            add([bt, sl, ref, "train.micro_batch_seqs"],
                f"train.micro_batch_seqs ({t.micro_batch_seqs}) must be 0 (off) or divide the {per_rank} sequences "
                f"each rank runs per micro-step ({bt} / ({sl} x {ref})).")

    # Attention heads (pipeline/model/base.py head_dim).
    d, h, kv = "model.model_dim", "model.num_heads", "model.num_kv_heads"
    heads_ok = ok(d, h, kv) and not (m.model_dim % m.num_heads or m.num_heads % m.num_kv_heads)
    if ok(d, h, kv) and not heads_ok:
        add([d, h, kv], f"model: model_dim {m.model_dim} must divide by num_heads {m.num_heads}, and num_heads "
                        f"by num_kv_heads {m.num_kv_heads}.")

    # Each chosen part's own rules (RoPE dims, MHA-only attention, feed-forward widths, sidecar
    # sites, ...), declared with the part (pipeline.model.registry `check=`).
    from pipeline.model.compose import cross_field_problems
    from pipeline.model.registry import SLOT_FIELDS

    if ok("model.trunk", *(f"model.{f}" for f in SLOT_FIELDS.values())):  # every part name resolved
        for paths, text in cross_field_problems(m, ok):
            add(paths, text)

    # Muon's Polar Express tuples are tuned for five iterations (pipeline/optim/muon_variants.py).
    if r.optim.muon_ns_coeffs == "polar_express" and ok("optim.muon_ns_steps") and r.optim.muon_ns_steps > 5:
        add(["optim.muon_ns_steps", "optim.muon_ns_coeffs"],
            f"optim.muon_ns_steps ({r.optim.muon_ns_steps}): Polar Express has 5 tuned iterations; set 1 to 5, or "
            "optim.muon_ns_coeffs: jordan.")

    # Evaluation windows (eval/windows.py) and the validation cap (pipeline/stages/evaluate.py).
    if ok("eval.stride", "eval.seq_len") and e.stride > e.seq_len:
        add(["eval.stride", "eval.seq_len"], f"eval.stride ({e.stride}) must be at most eval.seq_len ({e.seq_len}); "
                                             "each window moves by stride tokens.")
    if r.data.max_val_tokens and ok("data.max_val_tokens", "eval.seq_len") and r.data.max_val_tokens < e.seq_len:
        add(["data.max_val_tokens", "eval.seq_len"],
            f"data.max_val_tokens ({r.data.max_val_tokens}) must be 0 (all) or at least eval.seq_len ({e.seq_len}): "
            "evaluation needs one whole window.")

    # Test-time training (eval/ttt.py), only when it runs.
    if ttt.enabled:
        if ttt.mode == "score_first" and ok("ttt.chunk_tokens", "eval.seq_len") and ttt.chunk_tokens < e.seq_len:
            add(["ttt.chunk_tokens", "eval.seq_len"],
                f"ttt.chunk_tokens ({ttt.chunk_tokens}) must be at least eval.seq_len ({e.seq_len}): TTT trains on "
                "whole sequences cut from each chunk.")
        if ttt.mode == "phased_lora" and ok("ttt.lora_chunk_tokens", "eval.seq_len") \
                and ttt.lora_chunk_tokens > e.seq_len:
            add(["ttt.lora_chunk_tokens", "eval.seq_len"],
                f"ttt.lora_chunk_tokens ({ttt.lora_chunk_tokens}) must be at most eval.seq_len ({e.seq_len}): each "
                "chunk is scored inside one window of its document.")
        if ttt.mode == "score_first" and e.mode == "pr298_all_positions":
            add(["ttt.mode", "eval.mode"], "eval.mode pr298_all_positions scores tokens many times, and score-first "
                                           "TTT needs each scored once; use eval.mode sliding or nonoverlap.")
        blocks = {"unet_gpt": ("model.num_layers", m.num_layers), "looped_gpt": ("model.num_layers", m.num_layers),
                  "depth_recurrent": ("model.recurrent.unique_layers", m.recurrent.unique_layers)}.get(m.trunk)
        if blocks and ok("ttt.freeze_blocks", blocks[0]) and ttt.freeze_blocks > blocks[1]:
            add(["ttt.freeze_blocks", blocks[0]], f"ttt.freeze_blocks ({ttt.freeze_blocks}) is more than the model's "
                                                  f"{blocks[1]} blocks ({blocks[0]}).")

    # Export plans (pipeline/export/plan.py check_quant_rules).
    from pipeline.export.codec import SCHEMES

    plans = [("quant.rules", r.quant.rules)] + [(f"quant.compare.{i}.rules", p.rules)
                                                for i, p in enumerate(r.quant.compare)]
    for where, rules in plans:
        for i, rule in enumerate(rules):
            here = f"{where}.{i}"
            scheme = SCHEMES.get(rule.scheme)
            for key in ("clip_percentile", "clip_sigmas"):
                if getattr(rule, key) is not None and scheme is not None and not scheme.takes_clip:
                    clipping = "/".join(n for n, sc in SCHEMES.items() if sc.takes_clip)
                    add([f"{here}.{key}"], f"{here}: {key} applies to {clipping} only, not {rule.scheme}; remove it.")
            if rule.clip_percentile is not None and rule.clip_sigmas is not None:
                add([f"{here}.clip_percentile", f"{here}.clip_sigmas"],
                    f"{here}: clip_percentile and clip_sigmas both set a row's clip; keep one.")
            if rule.max_numel and ok(here) and rule.min_numel > rule.max_numel:
                add([f"{here}.min_numel", f"{here}.max_numel"],
                    f"{here}: min_numel ({rule.min_numel}) > max_numel ({rule.max_numel}), so it never applies.")
    names = [p.name for p in r.quant.compare]
    for i, name in enumerate(names):
        if name in names[:i]:
            add([f"quant.compare.{i}.name"], f"quant.compare.{i}.name: {name!r} names an earlier plan too; "
                                             "each plan's size is reported under its name.")
    return out


# ----------------------------------------------------------------------------- validation


def validate(data: dict, source: str, flags: list[_Flag] | None = None,
             problems: list[_Problem] | None = None) -> C.Recipe:
    """The Recipe for the raw mapping `data`, or one UserError listing every problem, each
    blamed on the flag in `flags` that set it, else on `source` (the recipe file)."""
    flags, problems = list(flags or []), list(problems or [])
    try:
        raw = _json_problems(data, ())
    except _TooLarge as e:  # nothing else can be checked in reasonable time
        _raise([*problems, e.args[0]], flags, source)
    problems += raw
    clean = _without(data, {p.locs[0] for p in raw})
    named, refused = _registry_problems(clean)
    problems += named
    clean = _without(clean, refused)  # a refused key is reported once, by its refusal
    schema, adapter = recipe_schema(), _schema_of(_registry_version())[1]
    recipe = None
    try:
        # JSON mode: strict scalars ("3" is no int, 1 is no bool) while mappings and lists
        # still validate into the frozen dataclasses and tuples.
        recipe = _to_recipe(adapter.validate_json(json.dumps(clean)))
    except ValidationError as e:
        problems += [_format_error(err) for err in e.errors()]
    except RecursionError:
        problems.append(_Problem(((),), "the recipe is nested too deeply."))
    problems += _scheme_problems(clean)
    fields = _constraint_problems(clean, schema)
    problems += fields
    if recipe is not None:
        bad = {_dotted(loc) for p in [*fields, *named] for loc in p.locs}
        problems += _cross_field_problems(recipe, bad)
    if problems:
        _raise(problems, flags, source)
    return recipe


def _raise(problems: list[_Problem], flags: list[_Flag], source: str) -> typing.NoReturn:
    """One UserError: a single problem on one line, several under a count."""
    lines = list(dict.fromkeys(f"{_blame(p, flags, source)}: {p.text}" for p in problems))
    if len(lines) == 1:
        raise UserError(lines[0])
    raise UserError(f"{len(lines)} problem(s):\n  " + "\n  ".join(lines))


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), seed: int | None = None) -> C.Recipe:
    path = resolve_recipe_path(recipe)
    data = _compose(path)
    # A reproduced entry's published figures are for `pgolf reproduce` (pipeline.reproduce), not
    # part of the run's settings.
    data.pop("published", None)
    data.setdefault("name", path.stem)
    flags: list[_Flag] = []
    problems: list[_Problem] = []
    for assignment in overrides:
        parts, raw = _parse_assignment(assignment)
        text = _flag_text("--set", assignment)
        try:
            value = parse_set_value(raw, _field_type(parts))
        except _BadValue as e:
            problems.append(_Problem((parts,), f"{'.'.join(parts)}: {e}."))
            flags.append(_Flag(text, parts))
            continue
        flags.append(_Flag(text, _set_in(data, parts, value, text)))
    if seed is not None:
        data["seed"] = seed
        flags.append(_Flag(_flag_text("--seed", seed), ("seed",)))
    return validate(data, str(path), flags, problems)
