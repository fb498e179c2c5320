"""Composing a model config: what a trunk takes, and configs built or changed in code.

    cfg = model_config(trunk="depth_recurrent", model_dim=64, recurrent=RecurrentConfig(k_rank=8))
    cfg = replace_model(cfg, leaky_selective_state=True)
    refusals("depth_recurrent", ["k_gain"])   # {"k_gain": "model.k_gain: trunk 'depth_recurrent' ..."}

A trunk takes (pipeline.model.registry): the slots of the part kinds it resolves, the keys it
reads, and the keys read by any registered part of those kinds. `refusals` names every other
key a config sets; the recipe loader (pipeline.recipe), `model_config` and `replace_model` refuse
them, so a flag a trunk does not implement is never silently ignored, and no list of unsupported
flags exists to forget one. `replace_model` checks values rather than keys: every setting the
trunk does not take must keep its default.

`cross_field_problems` runs the chosen parts' own load-time rules (their `check=`); `scratch`
undoes registrations made inside it (tests registering a throw-away part). Load-time only: the
generated submission never imports this module (its recipe was checked when it was generated).

    .venv/bin/python -m pytest -q tests/test_part_mechanism.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from typing import Callable

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.model import registry
from pipeline.model.registry import KINDS, SLOT_FIELDS, chosen_parts, part, setting_specs


def _core_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)} - {"settings"}


def trunk_takes(trunk_name: str) -> tuple[set[str], set[str]]:
    """(slot fields, setting keys) a config with this trunk may set: the slots of the kinds it
    resolves, the keys it reads and the keys any registered part of those kinds reads."""
    trunk = part("trunk", trunk_name)
    keys = set(trunk.reads)
    for kind in trunk.kinds:
        for name in registry.names(kind):
            keys |= set(part(kind, name).reads)
    return {SLOT_FIELDS[k] for k in trunk.kinds}, keys


def _readers(key: str) -> str:
    readers = [f"{kind} {name!r}" for kind in KINDS for name in registry.names(kind)
               if key in part(kind, name).reads]
    return f"read by {', '.join(readers)}" if readers else "read by no registered part"


def refusals(trunk_name: str, keys) -> dict[str, str]:
    """{key: message} for each `model.<key>` in `keys` that a config with trunk `trunk_name` may
    not set. Keys that are neither ModelConfig fields nor declared settings are left to the schema."""
    trunk = part("trunk", trunk_name)
    slots, readable = trunk_takes(trunk_name)
    specs = setting_specs()
    out = {}
    for key in keys:
        if key in SLOT_FIELDS.values() and key not in slots:
            kind = next(k for k, f in SLOT_FIELDS.items() if f == key)
            out[key] = (f"model.{key}: trunk {trunk.name!r} takes no {kind} part (it resolves "
                        f"{', '.join(trunk.kinds) or 'no part kinds'}); remove it or use a trunk that does.")
        elif key in specs and key not in readable:
            out[key] = (f"model.{key}: trunk {trunk.name!r} does not implement it ({_readers(key)}); "
                        "remove it or use a trunk that does.")
    return out


def read_keys(cfg: ModelConfig) -> set[str]:
    """The setting keys the trunk and the chosen parts of `cfg` read."""
    return {k for p in chosen_parts(cfg) for k in p.reads}


def check_taken(cfg: ModelConfig) -> None:
    """Raise UserError unless every setting and slot `cfg`'s trunk does not take holds its default."""
    slots, readable = trunk_takes(cfg.trunk)
    defaults = ModelConfig.__dataclass_fields__
    bad = [f for f in SLOT_FIELDS.values() if f not in slots and getattr(cfg, f) != defaults[f].default]
    bad += [k for k, s in setting_specs().items() if k not in readable and cfg.settings.get(k) != s.default]
    if bad:
        msgs = refusals(cfg.trunk, bad)
        raise UserError(" ".join(msgs[k] for k in bad))


def model_config(**values) -> ModelConfig:
    """A ModelConfig from its fields and part settings alike (`k_gain=True`, `elita=ElitaConfig(...)`),
    refusing unknown keys (TypeError) and keys the trunk does not take (UserError), as a recipe would."""
    core, specs = _core_fields(), setting_specs()
    unknown = [k for k in values if k not in core and k not in specs]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*core, *specs], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"model_config: unknown model key(s) {unknown}{hint}")
    refused = refusals(values.get("trunk", ModelConfig.__dataclass_fields__["trunk"].default), values)
    if refused:
        raise UserError(" ".join(refused.values()))
    return ModelConfig(**{k: v for k, v in values.items() if k in core},
                       settings={k: v for k, v in values.items() if k not in core})


def replace_model(cfg: ModelConfig, **changes) -> ModelConfig:
    """`dataclasses.replace` for fields and part settings alike; the result must still be one the
    trunk takes (`check_taken`)."""
    core = _core_fields()
    unknown = [k for k in changes if k not in core and k not in cfg.settings]
    if unknown:
        raise TypeError(f"replace_model: unknown model key(s) {unknown}")
    settings = {**cfg.settings, **{k: v for k, v in changes.items() if k not in core}}
    out = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in core}, settings=settings)
    check_taken(out)
    return out


def cross_field_problems(cfg: ModelConfig, ok: Callable[..., bool]) -> list[tuple[list[str], str]]:
    """The chosen parts' own load-time rules (their `check=`), as (dotted paths, message)."""
    out = []
    for p in chosen_parts(cfg):
        if p.check is not None:
            out += p.check(cfg, ok)
    return out


@contextlib.contextmanager
def scratch():
    """Registrations (parts, settings) made inside the block are undone on exit."""
    setting_specs()  # load the real parts first, so the snapshot holds them
    parts = {k: dict(v) for k, v in registry._PARTS.items()}
    declared = dict(registry._SETTINGS)
    try:
        yield
    finally:
        for k, table in registry._PARTS.items():
            table.clear()
            table.update(parts[k])
        registry._SETTINGS.clear()
        registry._SETTINGS.update(declared)
        registry._bump()
