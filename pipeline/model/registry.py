"""The one place where recipe strings become model parts.

A part registers itself with `@register(kind, name)`; `build_model` resolves the trunk
named by `cfg.trunk`, and trunks resolve their attention / mlp / residual parts through
`resolve`. Unknown names fail with the list of known ones and a did-you-mean.

Kinds and the constructor signature each expects:
- "trunk":     factory(cfg: ModelConfig) -> LanguageModel
- "attention": factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "mlp":       factory(cfg: ModelConfig, layer_idx: int) -> module(x[B,T,D]) -> [B,T,D]
- "residual":  factory(cfg: ModelConfig, layer_idx: int, site: str) -> module(x, y) -> x_new
- "normalizer": factory(cfg: ModelConfig) -> fn(z, dim) -> weights >= 0 summing to 1 along dim
                (for learned mixing weights only; never attention or the LM head)

`part_modules(cfg)` names the source files of the parts a config uses, so the generated
submission script carries only those (every byte of code counts against the cap).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from pipeline.errors import UserError

KINDS = ("trunk", "attention", "mlp", "residual", "normalizer")
_REGISTRY: dict[str, dict[str, Callable]] = {k: {} for k in KINDS}

# Modules whose import registers parts. Listed explicitly so the set of parts is visible here.
_PART_MODULES = (
    "pipeline.model.parts.attention",
    "pipeline.model.parts.mlp",
    "pipeline.model.parts.residual",
    "pipeline.model.parts.true_evolving",
    "pipeline.model.parts.elita",
    "pipeline.model.parts.orthopar",
    "pipeline.model.parts.normalizers",
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
                # The generated submission script ships only the part modules its recipe uses
                # (`part_modules`); the others are absent there by design. A missing dependency
                # *inside* a module is a real error and is raised.
                if e.name != mod:
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
        field = "mix_normalizer" if kind == "normalizer" else kind  # the ModelConfig field that names it
        raise UserError(f"model.{field}: unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(table))}.")
    return table[name]


def build_model(cfg):
    """Build the model a ModelConfig describes (on the current default device)."""
    return resolve("trunk", cfg.trunk)(cfg)


def part_modules(cfg) -> list[str]:
    """Module names that define the trunk and the parts a ModelConfig names."""
    used = [("trunk", cfg.trunk), ("attention", cfg.attention), ("mlp", cfg.mlp), ("residual", cfg.residual)]
    if cfg.mix_normalizer != "none":
        used.append(("normalizer", cfg.mix_normalizer))
    return sorted({resolve(kind, name).__module__ for kind, name in used})
