"""The one place where recipe strings become model parts.

A part registers itself with `@register(kind, name)`; `build_model` resolves the trunk
named by `cfg.trunk`, and trunks resolve their attention / mlp / residual parts through
`resolve`. Unknown names fail with the list of known ones and a did-you-mean.

Kinds and the constructor signature each expects:
- "trunk":     factory(cfg: ModelConfig) -> LanguageModel
- "attention": factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "mlp":       factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "residual":  factory(cfg: ModelConfig, layer_idx: int, site: str) -> module(x, y) -> x_new
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from pipeline.errors import UserError

KINDS = ("trunk", "attention", "mlp", "residual")
_REGISTRY: dict[str, dict[str, Callable]] = {k: {} for k in KINDS}

# Modules whose import registers parts. Listed explicitly so the set of parts is visible here.
_PART_MODULES = (
    "pipeline.model.parts.attention",
    "pipeline.model.parts.mlp",
    "pipeline.model.parts.residual",
    "pipeline.model.gpt",
    "pipeline.model.recurrent",
)
_loaded = False


def register(kind: str, name: str):
    if kind not in _REGISTRY:
        raise ValueError(f"unknown part kind {kind!r}; kinds are {KINDS}")

    def deco(factory):
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} part {name!r} registered twice")
        _REGISTRY[kind][name] = factory
        return factory

    return deco


def _load_parts() -> None:
    global _loaded
    if not _loaded:
        for mod in _PART_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a real missing dependency, not an absent optional module
                    raise
        _loaded = True


def names(kind: str) -> list[str]:
    _load_parts()
    return sorted(_REGISTRY[kind])


def resolve(kind: str, name: str) -> Callable:
    _load_parts()
    table = _REGISTRY[kind]
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"model.{kind}: unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(table))}.")
    return table[name]


def build_model(cfg):
    """Build the model a ModelConfig describes (on the current default device)."""
    return resolve("trunk", cfg.trunk)(cfg)
