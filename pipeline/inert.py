"""Settings a recipe sets that have no effect under its own choices: said, not silently ignored.

A recipe (or `--set`) can change a setting that only one mode reads while the recipe runs another:
`ttt.lora_rank` under `ttt.mode: score_first`, `train.coprime.*` with the sequential loader,
`ema.decay` with EMA off, the TTT learning rate with `ttt.epochs: 0`. Such a value changes no
computation, and a user who set it expects that it does. It is not an error, because flipping a
mode from the command line (`pgolf run frontier --set ttt.mode=score_first`) leaves the other
mode's settings in the recipe on purpose; `pgolf check` and `pgolf run` print one `note:` line per
such setting, naming what would make it count, and one line saying that it is still part of the
recipe (its hash keys the stage caches, and the script embeds it).

A setting counts as set when it differs from its dataclass default (pipeline.config). The table
below says, per setting, when it takes effect; it follows the code that reads it (eval/ttt.py,
eval/ttt_lora.py, eval/windows.py, pipeline/data/coprime_loader.py,
pipeline/optim/grad_transforms.py, pipeline/stages/ema.py, pipeline/export/calibration.py).

    inert_settings(recipe) -> ["ttt.lora_rank=8 has no effect: ttt.mode is score_first; ...", ..., "such a ..."]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from pipeline.config import Recipe

# A rule returns None when the setting takes effect, else the reason it does not.
Rule = Callable[[Recipe], Optional[str]]


def _ttt_on(r: Recipe) -> Optional[str]:
    return None if r.ttt.enabled else "ttt.enabled is false"


def _ttt_mode(*modes: str) -> Rule:
    def rule(r: Recipe) -> Optional[str]:
        if not r.ttt.enabled:
            return "ttt.enabled is false"
        if r.ttt.mode not in modes:
            return f"ttt.mode is {r.ttt.mode}; only {' or '.join(modes)} reads it"
        return None
    return rule


def _ttt_training(*modes: str, epochs: bool = False) -> Rule:
    """Read by the TTT updates of `modes`; phased_lora runs them only in its global SGD phases, and
    no mode updates with ttt.epochs 0 (`epochs`: the rule of ttt.epochs itself, read even then)."""
    def rule(r: Recipe) -> Optional[str]:
        reason = _ttt_mode(*modes)(r)
        if reason is None and r.ttt.mode == "phased_lora" and r.ttt.phase_prefix_docs == 0:
            return "ttt.phase_prefix_docs is 0 (no global SGD phases)"
        if reason is None and not epochs and r.ttt.epochs == 0:
            return "ttt.epochs is 0 (no TTT updates)"
        return reason
    return rule


_ALL_MODES = ("score_first", "phased_lora", "pre_score_full_val")


def _ttt_optimizer(name: str) -> Rule:
    # pre_score_full_val always runs AdamW (PR #684's ttt_adapt); the other modes use ttt.optimizer.
    def rule(r: Recipe) -> Optional[str]:
        reason = _ttt_training(*_ALL_MODES)(r)
        if reason:
            return reason
        used = "adamw" if r.ttt.mode == "pre_score_full_val" else r.ttt.optimizer
        return None if used == name else f"the TTT optimizer is {used}; only {name} reads it"
    return rule


def _stride(r: Recipe) -> Optional[str]:
    # sliding and PR #298's windows step by it, and so does score-first TTT's scoring, whatever eval.mode
    if r.eval.mode in ("sliding", "pr298_all_positions") or (r.ttt.enabled and r.ttt.mode == "score_first"):
        return None
    return f"eval.mode is {r.eval.mode}, and no score-first TTT scores by sliding windows"


def _calibrating(r: Recipe) -> Optional[str]:
    from pipeline.export.calibration import calibrating_schemes

    return None if calibrating_schemes(r) else "no scheme in quant.rules or quant.compare calibrates (GPTQ does)"


_LORA = ("lora_rank", "lora_alpha", "lora_lr", "lora_beta1", "lora_beta2", "lora_eps", "lora_weight_decay",
         "lora_chunk_tokens", "lora_steps", "lora_batch_docs", "lora_targets", "lora_head", "phase_prefix_docs")

RULES: dict[str, Rule] = {
    "ttt.mode": _ttt_on,
    # the updates' settings; batch_seqs bounds an update pass (phased_lora scores lora_batch_docs at once)
    "ttt.epochs": _ttt_training(*_ALL_MODES, epochs=True),
    **{f"ttt.{k}": _ttt_training(*_ALL_MODES) for k in ("lr", "min_lr", "weight_decay", "grad_clip", "batch_seqs",
                                                         "freeze_blocks")},
    **{f"ttt.{k}": _ttt_mode("phased_lora") for k in _LORA},
    "ttt.phases": _ttt_training("phased_lora"),
    "ttt.chunk_tokens": _ttt_training("score_first", "phased_lora"),
    # pre_score_full_val always runs AdamW: the one value besides the default is then what runs
    "ttt.optimizer": _ttt_training(*_ALL_MODES),
    "ttt.warmup_epochs": _ttt_mode("pre_score_full_val"),
    "ttt.momentum": _ttt_optimizer("sgd"),
    "ttt.beta1": _ttt_optimizer("adamw"),
    "ttt.beta2": _ttt_optimizer("adamw"),
    "train.coprime": lambda r: None if r.train.loader == "coprime" else f"train.loader is {r.train.loader}",
    "optim.grad_conditioning.hyper_lr_scale": lambda r: None if r.optim.grad_conditioning.mode == "hypergradient"
    else "optim.grad_conditioning.mode is fixed",
    "optim.grad_conditioning.hyper_lr_bias": lambda r: None if r.optim.grad_conditioning.mode == "hypergradient"
    else "optim.grad_conditioning.mode is fixed",
    "eval.stride": _stride,
    "ema.decay": lambda r: None if r.ema.enabled else "ema.enabled is false",
    "quant.calibration_batches": _calibrating,
}


def _lookup(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _default(path: str):
    """The dataclass default of the setting at `path` (a whole default sub-config for a section)."""
    section, _, name = path.rpartition(".")
    owner = _lookup(Recipe(name="x"), section) if section else Recipe(name="x")
    f = {f.name: f for f in dataclasses.fields(owner)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _changed(recipe: Recipe, path: str) -> list[str]:
    """`path=value` for each setting under `path` that differs from its default (a section: its fields)."""
    value, default = _lookup(recipe, path), _default(path)
    if dataclasses.is_dataclass(value):
        return [f"{path}.{f.name}={getattr(value, f.name)}" for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default, f.name)]
    return [f"{path}={value}"] if value != default else []


def inert_settings(recipe: Recipe) -> list[str]:
    """One sentence per setting `recipe` changes from its default that has no effect in this recipe,
    then (when there is any) one sentence on what such a setting still does."""
    out = []
    for path, rule in RULES.items():
        changed = _changed(recipe, path)
        reason = rule(recipe) if changed else None
        out += [f"{setting} has no effect: {reason}" for setting in changed] if reason else []
    if out:  # still part of the recipe: its hash (stage caches) and the script's embedded recipe
        out.append("such a setting changes no computation, but it is part of the recipe: a new value reruns the "
                   "stages whose settings hold it, and train_gpt.py embeds it; remove it if unwanted")
    return out
