"""The one place where recipe strings become model parts, and where parts declare their settings.

A part lives in one file (pipeline/model/parts/<name>.py) that declares everything about it:

    @dataclass(frozen=True)
    class ElitaConfig:                                  # its settings, with load-time constraints
        ff_rank: int = constrained(8, ge=1, le=1024)
    settings(ElitaConfig, section="elita")              # a recipe writes them as model.elita.*

    @register("attention", "elita", reads=("elita",))   # the recipe keys it reads
    def elita_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module: ...

and gives every Parameter it creates a role where it creates it (pipeline.model.roles). Nothing
else lists it: the recipe schema, `ModelConfig`, the optimizer groups, the quant plan and the
generated script's module list all read these declarations. Modules in pipeline/model/parts are
found by listing the package, so a new file needs no entry anywhere else.

Settings. `settings(cls, section="x")` declares `model.x.*` (the dataclass is the section);
`settings(cls)` declares each field of `cls` as its own key `model.<field>` (the flat flags the
published recipes use, e.g. `model.k_gain`). Keys are unique across all parts and `ModelConfig`'s
own fields (trunk, sizes, part names). `ModelConfig` holds every declared key, the recipe's value
or the default (`cfg.k_gain`, `cfg.elita`), so a model's identity (the blob header, the cache
keys) is the whole resolved `model:` section.

Trunks. `register("trunk", name, kinds=(...), reads=(...))`: the part kinds it resolves (unet_gpt:
attention, mlp, residual, normalizer; depth_recurrent: mlp only, it builds its own attention) and
the keys it reads itself. A recipe may set only the keys its trunk reads, or that some registered
part of a kind the trunk resolves reads; anything else is refused when the recipe loads, and by
the helpers that build configs in code (pipeline.model.compose). So a flag a trunk does not
implement can never be silently ignored, and no deny-list has to remember it.

Kinds and the constructor signature each expects:
- "trunk":     factory(cfg: ModelConfig) -> LanguageModel
- "attention": factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "mlp":       factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "residual":  factory(cfg: ModelConfig, layer_idx: int, site: str) -> module(x, y) -> x_new
- "normalizer": factory(cfg: ModelConfig) -> fn(z, dim) -> weights >= 0 summing to 1 along dim
                (for learned mixing weights only; never attention or the LM head)

`check=fn(cfg, ok) -> [(dotted paths, message)]` on a registration adds the part's cross-field
rules to recipe loading (run when the part is chosen; `ok(*paths)` is False while one of those
fields breaks its own constraint). `part_modules(cfg)` names the source files of the trunk and
chosen parts, so the generated submission carries only those (every byte of code counts); this
module is what the submission needs at run time, the load-time side is pipeline.model.compose.

    .venv/bin/python -m pytest -q tests/test_part_mechanism.py
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pipeline.errors import UserError

KINDS = ("trunk", "attention", "mlp", "residual", "normalizer")
# The ModelConfig field that names the chosen part of each kind a trunk resolves.
SLOT_FIELDS = {"attention": "attention", "mlp": "mlp", "residual": "residual", "normalizer": "mix_normalizer"}
# A slot value that chooses no part at all.
NO_PART = {"normalizer": "none"}

# Trunk modules, imported to register their trunks. Part modules are every module of
# pipeline.model.parts (found by listing the package): a shipped script carries only its own.
_TRUNK_MODULES = ("pipeline.model.gpt", "pipeline.model.recurrent", "pipeline.model.looped")
_PARTS_PACKAGE = "pipeline.model.parts"


@dataclass(frozen=True)
class Part:
    kind: str
    name: str
    factory: Callable
    reads: tuple[str, ...] = ()  # recipe keys under model: that this part reads
    kinds: tuple[str, ...] = ()  # trunks only: the part kinds the trunk resolves
    check: Optional[Callable] = None  # fn(cfg, ok) -> [(paths, message)], the part's cross-field rules

    @property
    def module(self) -> str:
        return self.factory.__module__


@dataclass(frozen=True)
class Setting:
    """One recipe key under `model:` that a part declared."""

    key: str
    type: Any  # the resolved annotation (a dataclass for a section)
    field: dataclasses.Field  # default, default_factory and constraints, as the schema uses them
    owner: type  # the dataclass that declared it
    section: bool  # True: `key` is the whole dataclass `owner` (model.<key>.*)
    omit_default: bool = False  # left out of the serialized model section while it holds its default

    @property
    def default(self):
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


_PARTS: dict[str, dict[str, Part]] = {k: {} for k in KINDS}
_SETTINGS: dict[str, Setting] = {}
_state = {"loaded": False, "loading": False, "version": 0}


def _bump() -> None:
    _state["version"] += 1  # the recipe schema is rebuilt when the registry changes


def version() -> int:
    return _state["version"]


def register(kind: str, name: str, *, reads: tuple[str, ...] = (), kinds: tuple[str, ...] = (),
             check: Optional[Callable] = None):
    """Decorator registering a part factory; see the module docstring for `reads`, `kinds`, `check`."""
    if kind not in _PARTS:
        raise ValueError(f"unknown part kind {kind!r}; kinds are {KINDS}")
    if kinds and kind != "trunk":
        raise ValueError(f"{kind} part {name!r}: only a trunk resolves part kinds")
    bad = [k for k in kinds if k not in SLOT_FIELDS]
    if bad:
        raise ValueError(f"trunk {name!r} resolves unknown part kinds {bad}; kinds are {list(SLOT_FIELDS)}")
    if isinstance(reads, str):
        raise TypeError(f"{kind} part {name!r}: reads= takes a tuple of recipe keys, got the string {reads!r}")

    def deco(factory):
        if name in _PARTS[kind]:
            raise ValueError(f"{kind} part {name!r} registered twice")
        _PARTS[kind][name] = Part(kind, name, factory, tuple(reads), tuple(kinds), check)
        _bump()
        return factory

    return deco


def _core_fields() -> set[str]:
    from pipeline.config import ModelConfig

    return {f.name for f in dataclasses.fields(ModelConfig)} - {"settings"}


def settings(cls=None, *, section: Optional[str] = None, omit_default: bool = False):
    """Declare a part's settings dataclass: `section="x"` makes it `model.x.*`; without, each of its
    fields is its own key `model.<field>`. Usable as a call or as a class decorator.

    `omit_default=True`: the key is written into the serialized model section (`to_dict`: the blob
    header, stage cache keys, the shipped recipe) only when it differs from its default. Declaring
    such a key then leaves every existing recipe's identity, and so its artifacts, byte-identical
    (tests/test_golden.py pins the tiny recipe's blob); reading it back fills in the default."""
    if cls is None:
        return lambda c: settings(c, section=section, omit_default=omit_default)
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"settings() takes a dataclass, got {cls!r}")
    if section is not None:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"section {section!r}: {cls.__name__} needs defaults for {missing}")
        new = [Setting(section, cls, dataclasses.field(default_factory=cls), cls, True, omit_default)]
    else:
        hints = typing.get_type_hints(cls)
        new = [Setting(f.name, hints[f.name], f, cls, False, omit_default) for f in dataclasses.fields(cls)]
    core = _core_fields()
    for s in new:
        if s.key in core:
            raise ValueError(f"{cls.__name__}: model.{s.key} is a ModelConfig field, not a part setting")
        if s.key in _SETTINGS:
            raise ValueError(f"{cls.__name__}: model.{s.key} is already declared by {_SETTINGS[s.key].owner.__name__}")
    for s in new:
        _SETTINGS[s.key] = s
    _bump()
    return cls


def _load_parts() -> None:
    if _state["loaded"] or _state["loading"]:
        return
    _state["loading"] = True
    try:
        parts = importlib.import_module(_PARTS_PACKAGE)
        modules = [f"{_PARTS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(parts.__path__)]
        for mod in (*modules, *_TRUNK_MODULES):
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                # The generated submission script ships only the trunk and parts its recipe uses
                # (`part_modules`); the other trunk is absent there by design. A missing
                # dependency *inside* a module is a real error and is raised.
                if e.name != mod:
                    raise
        _state["loaded"] = True
    finally:
        _state["loading"] = False


def names(kind: str) -> list[str]:
    _load_parts()
    return sorted(_PARTS[kind])


def part(kind: str, name: str) -> Part:
    _load_parts()
    table = _PARTS[kind]
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        field = SLOT_FIELDS.get(kind, kind)  # the ModelConfig field that names it
        raise UserError(f"model.{field}: unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(table))}.")
    return table[name]


def resolve(kind: str, name: str) -> Callable:
    return part(kind, name).factory


def setting_specs() -> dict[str, Setting]:
    """Every declared `model.<key>`, in declaration order."""
    _load_parts()
    return dict(_SETTINGS)


# ------------------------------------------------------------------------------ building


def chosen_parts(cfg) -> list[Part]:
    """The trunk and the part of each kind it resolves, as `cfg` names them."""
    trunk = part("trunk", cfg.trunk)
    out = [trunk]
    for kind in trunk.kinds:
        name = getattr(cfg, SLOT_FIELDS[kind])
        if name != NO_PART.get(kind):
            out.append(part(kind, name))
    return out


def build_model(cfg):
    """Build the model a ModelConfig describes (on the current default device)."""
    return resolve("trunk", cfg.trunk)(cfg)


def part_modules(cfg) -> list[str]:
    """Module names that define the trunk and the parts a ModelConfig chooses."""
    return sorted({p.module for p in chosen_parts(cfg)})


# ------------------------------------------------------------------------------ ModelConfig support


def identity_settings(values) -> dict:
    """`values` (a ModelConfig's settings) without the `omit_default` keys that hold their default:
    what the serialized model section writes (pipeline.config.to_dict)."""
    _load_parts()
    return {k: v for k, v in values.items()
            if not (k in _SETTINGS and _SETTINGS[k].omit_default and v == _SETTINGS[k].default)}


def complete_settings(values) -> dict:
    """`values` with every declared key filled in (its default when absent) and typed (sections
    become their dataclass). Keys no loaded module declares are kept as given: a generated
    script carries only its recipe's parts, and the others' values only pass through."""
    from pipeline.config import _from_value

    _load_parts()
    out = {}
    for key, spec in _SETTINGS.items():
        out[key] = _from_value(spec.type, values[key]) if key in values else spec.default
    for key, value in values.items():
        if key not in _SETTINGS:
            out[key] = value
    return out
