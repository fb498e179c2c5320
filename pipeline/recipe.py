"""Load a recipe YAML strictly into the frozen `pipeline.config.Recipe`.

    recipe = load_recipe("sidecar48", overrides=["train.max_steps=20"], seed=42)

- `RECIPE` is a path to a .yaml file, or a name resolved to `recipes/<name>.yaml`.
- `extends: other.yaml` (relative to the file) composes recipes: mappings merge key by key,
  the child wins, lists and scalars are replaced whole.
- `--set a.b=c` overrides are parsed as YAML values and applied after composition.
- Every problem is reported at once, each with its dotted path; an unknown key or value
  gets a did-you-mean. Types are strict: "3" is not an int, 1 is not a bool.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline import config as C
from pipeline.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Strict, closed schema on every config dataclass (they stay plain stdlib dataclasses).
for _cls in vars(C).values():
    if dataclasses.is_dataclass(_cls) and isinstance(_cls, type):
        _cls.__pydantic_config__ = ConfigDict(extra="forbid", strict=True)

_ADAPTER = TypeAdapter(C.Recipe)


def resolve_recipe_path(recipe: str | Path) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise UserError(f"recipe file {p} does not exist.")
        return p
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(recipe), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown recipe {recipe!r}.{hint} Known recipes: {', '.join(known)} "
                    f"(or pass a path to a .yaml file).")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"malformed YAML in {where}: {e.problem}. Fix the syntax there.") from None
    except yaml.YAMLError as e:
        raise UserError(f"malformed YAML in {path}: {e}") from None
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
    if not isinstance(parent, str):
        raise UserError(f"{path}: 'extends' must be a file name, got {parent!r}.")
    parent_path = (path.parent / parent)
    if not parent_path.exists():
        raise UserError(f"{path}: extends {parent!r}, which does not exist next to it.")
    return _merge(_compose(parent_path, (*seen, path)), data)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override in place (value parsed as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected dotted.key=value, e.g. train.max_steps=100.")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {assignment!r}: empty key segment in {key!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise UserError(f"--set {assignment!r}: {'.'.join(parts[:i + 1])} is not a section.")
        node = nxt
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- errors


def _dataclass_at(loc: tuple) -> type | None:
    """The dataclass type found by walking field names in `loc` from Recipe."""
    tp: Any = C.Recipe
    for part in loc:
        tp = _unwrap(tp)
        if not (dataclasses.is_dataclass(tp) and isinstance(part, str)):
            if isinstance(part, int):
                continue
            return None
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            return None
        tp = typing.get_type_hints(tp)[part]
    tp = _unwrap(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def _unwrap(tp):
    """Optional[X] -> X; tuple[X, ...] -> X."""
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        return _unwrap(non_none[0]) if len(non_none) == 1 else tp
    if typing.get_origin(tp) is tuple and args:
        return _unwrap(args[0])
    return tp


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "json-"))))
    # pydantic adds union-branch / dataclass tags to locations; keep only real field names.
    clean = tuple(p for p in loc if isinstance(p, int) or not any(ch in p for ch in "[]()"))
    path = ".".join(str(p) for p in clean) or "<recipe>"
    kind, msg = err["type"], err["msg"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = _dataclass_at(clean[:-1])
        known = [f.name for f in dataclasses.fields(parent)] if parent else []
        close = difflib.get_close_matches(str(clean[-1]), known, n=1)
        hint = f" Did you mean {'.'.join(map(str, (*clean[:-1], close[0])))!r}?" if close else ""
        return f"{path}: unknown key.{hint}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(err.get("input")), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{path}: {err.get('input')!r} is not one of {expected}.{hint}"
    if kind == "missing":
        return f"{path}: required key is missing."
    return f"{path}: {msg} (got {err.get('input')!r})."


def _semantic_errors(data: dict) -> list[str]:
    """Checks the schema cannot express: registry part names and cross-field rules.

    Runs on the raw mapping so its findings are reported together with the schema's."""
    from pipeline.model import registry

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    defaults_m, defaults_t = C.ModelConfig(), C.TrainConfig()
    errors = []
    kinds = ("trunk", "attention", "mlp", "residual")
    named_parts = [(kind, model.get(kind, getattr(defaults_m, kind))) for kind in kinds]
    if model.get("mix_normalizer", "none") != "none":
        named_parts.append(("normalizer", model["mix_normalizer"]))
    for kind, value in named_parts:
        if isinstance(value, str):
            try:
                registry.resolve(kind, value)
            except UserError as e:
                errors.append(str(e))
    if model.get("leaky_selective_state") is True and model.get("trunk", defaults_m.trunk) != "depth_recurrent":
        errors.append("model.leaky_selective_state: only meaningful with model.trunk=depth_recurrent.")
    bt, sl = train.get("batch_tokens", defaults_t.batch_tokens), train.get("seq_len", defaults_t.seq_len)
    if isinstance(bt, int) and isinstance(sl, int) and sl > 0 and bt % sl:
        errors.append(f"train.batch_tokens ({bt}) must be a multiple of train.seq_len ({sl}).")
    d, h = model.get("model_dim", defaults_m.model_dim), model.get("num_heads", defaults_m.num_heads)
    kv = model.get("num_kv_heads", defaults_m.num_kv_heads)
    if all(isinstance(v, int) and v > 0 for v in (d, h, kv)) and (d % h or h % kv):
        errors.append(f"model: model_dim {d} must divide by num_heads {h}, and num_heads by num_kv_heads {kv}.")
    return errors


def _pattern_errors(recipe: C.Recipe) -> list[str]:
    """Regular expressions in quant and gradient-conditioning rules, compiled at load time so
    that `check` and `audit` catch a bad one, not only the stage that first uses it."""
    from pipeline.optim.grad_transforms import check_grad_conditioning
    from pipeline.stages.quantize import check_quant_rules

    errors = []
    checks = ((check_quant_rules, recipe.quant.rules), (check_grad_conditioning, recipe.optim.grad_conditioning))
    for check, cfg in checks:
        try:
            check(cfg)
        except UserError as e:
            errors.append(str(e))
    return errors


def validate(data: dict, source: str) -> C.Recipe:
    problems = _semantic_errors(data)
    try:
        # JSON mode: strict scalars ("3" is no int, 1 is no bool) while mappings and lists
        # still validate into the frozen dataclasses and tuples.
        recipe = _ADAPTER.validate_json(json.dumps(data))
    except ValidationError as e:
        problems = list(dict.fromkeys([_format_error(err) for err in e.errors()] + problems))
        recipe = None
    if recipe is not None:
        problems += _pattern_errors(recipe)
    if problems:
        raise UserError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return recipe


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), seed: int | None = None) -> C.Recipe:
    path = resolve_recipe_path(recipe)
    data = _compose(path)
    data.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(data, assignment)
    if seed is not None:
        data["seed"] = seed
    return validate(data, str(path))
