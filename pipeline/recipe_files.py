"""Recipe files: YAML read with the YAML 1.2 core schema, recipe names resolved to
`recipes/<name>.yaml`, and `extends:` composition (mappings merge key by key, the child wins, lists
and scalars are replaced whole; the parent is a file next to the child or a built-in recipe, and a
child without its own `name:` is named after its file). Every failure is a UserError naming the
file and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import yaml

from pipeline.errors import UserError
from pipeline.recipe_rules import show

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


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


def load_yaml(text: str):
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


def _builtin_recipe(name: str) -> Path | None:
    """recipes/<name>.yaml when `name` is a plain recipe name and that file exists, else None."""
    path = RECIPES_DIR / f"{name}.yaml"
    return path if re.fullmatch(r"[A-Za-z0-9_.+-]+", name) and _is_file(path) else None


def _builtin_names() -> list[str]:
    return sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(recipe: str | Path) -> Path:
    text = str(recipe)
    if not text or "\x00" in text:
        raise UserError(f"recipe {text!r} is not a recipe name or a path to a .yaml file.")
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not _is_file(p):
            raise UserError(f"recipe file {show(str(p))} does not exist.")
        return p
    candidate = _builtin_recipe(text)
    if candidate is not None:
        return candidate
    known = _builtin_names()
    close = difflib.get_close_matches(text, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown recipe {show(text)}.{hint} Known recipes: {', '.join(known)} "
                    f"(or pass a path to a .yaml file).")


def read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
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


def merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def compose(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p.name) for p in (*seen, path))
        raise UserError(f"recipe extends itself in a cycle: {chain}.")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent or "\x00" in parent:
        raise UserError(f"{path}: 'extends' must be a file name, got {show(parent)}.")
    parent_path = _parent_path(path, parent)
    merged = merge(compose(parent_path, (*seen, path)), data)
    # A recipe is named by its own file unless it says otherwise: inheriting the parent's name would
    # file its runs and records folders under the parent's.
    if "name" not in data:
        merged["name"] = path.stem
    return merged


def _parent_path(path: Path, parent: str) -> Path:
    """What `extends: parent` in `path` names: a file next to it, else a built-in recipe (`tiny` or
    `tiny.yaml`). Raises UserError naming both places when neither exists."""
    beside = path.parent / parent
    if _is_file(beside):
        return beside
    builtin = _builtin_recipe(parent.removesuffix(".yaml"))
    if builtin is not None:
        return builtin
    raise UserError(f"{path}: extends {parent!r}, which is neither a file next to it nor a built-in recipe "
                    f"({', '.join(_builtin_names())}); give a path relative to {path.parent} or a built-in "
                    f"recipe's name.")

