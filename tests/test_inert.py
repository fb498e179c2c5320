"""Settings a recipe's own choices never read are named (pipeline.inert), not silently ignored."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import Recipe
from pipeline.inert import RULES
from pipeline.inert import inert_settings as _inert_settings
from pipeline.recipe import load_recipe
from pipeline.recipe_files import RECIPES_DIR


TAIL = ("such a setting changes no computation, but it is part of the recipe: a new value reruns the stages whose "
        "settings hold it, and train_gpt.py embeds it; remove it if unwanted")


def inert_settings(recipe) -> list[str]:
    """The per-setting notes, after checking the one closing sentence every non-empty list ends with."""
    notes = _inert_settings(recipe)
    assert not notes or notes[-1] == TAIL
    return notes[:-1]


def test_every_rule_names_a_real_setting():
    for path in RULES:
        obj = Recipe(name="x")
        for part in path.split("."):
            assert part in {f.name for f in dataclasses.fields(obj)}, path
            obj = getattr(obj, part)


def test_shipped_recipes_set_nothing_they_do_not_read():
    found = {p.stem: inert_settings(load_recipe(p.stem)) for p in sorted(RECIPES_DIR.glob("*.yaml"))}
    # the card turns off the TTT of the recipe it extends: said, and nothing else anywhere
    assert found.pop("true_evolving_card") == ["ttt.epochs=1 has no effect: ttt.enabled is false",
                                               "ttt.chunk_tokens=4096 has no effect: ttt.enabled is false"]
    assert found and all(v == [] for v in found.values()), found


def test_flipping_frontiers_ttt_mode_names_the_lora_settings_left_behind():
    notes = inert_settings(load_recipe("frontier", ["ttt.mode=score_first"]))
    assert notes == [f"ttt.{k} has no effect: ttt.mode is score_first; only phased_lora reads it"
                     for k in ("lora_rank=80", "lora_alpha=144.0", "lora_beta2=0.99", "phase_prefix_docs=2500")]


@pytest.mark.parametrize("sets, expected", [
    (["ttt.lora_rank=8"], ["ttt.lora_rank=8 has no effect: ttt.mode is score_first; only phased_lora reads it"]),
    (["ttt.enabled=false", "ttt.lr=0.5"], [f"ttt.{k} has no effect: ttt.enabled is false"
                                           for k in ("epochs=1", "lr=0.5", "chunk_tokens=4096")]),
    # score_first with SGD reads momentum, not the Adam betas; pre_score_full_val is always AdamW
    (["ttt.optimizer=sgd", "ttt.beta1=0.5"],
     ["ttt.beta1=0.5 has no effect: the TTT optimizer is sgd; only adamw reads it"]),
    (["ttt.epochs=0", "ttt.lr=0.5"],  # no update: neither the rate nor the chunking (tiny's 4096) changes a score
     [f"ttt.{k} has no effect: ttt.epochs is 0 (no TTT updates)" for k in ("lr=0.5", "chunk_tokens=4096")]),
    # pre_score_full_val always runs AdamW, which is then what ttt.optimizer=adamw says: no note
    (["ttt.mode=pre_score_full_val", "ttt.optimizer=adamw", "ttt.chunk_tokens=32768"], []),
    # stride steps sliding windows and score-first TTT's scoring, whatever eval.mode
    (["eval.mode=nonoverlap", "eval.stride=32"], []),
    (["eval.mode=nonoverlap", "eval.stride=32", "ttt.mode=phased_lora", "ttt.phase_prefix_docs=10"],
     ["eval.stride=32 has no effect: eval.mode is nonoverlap, and no score-first TTT scores by sliding windows"]),
    (["ttt.mode=pre_score_full_val", "ttt.momentum=0.5"],
     ["ttt.chunk_tokens=4096 has no effect: ttt.mode is pre_score_full_val; only score_first or phased_lora reads it",
      "ttt.momentum=0.5 has no effect: the TTT optimizer is adamw; only sgd reads it"]),
    (["ttt.mode=phased_lora", "ttt.phase_prefix_docs=0", "ttt.phases=2"],
     # no global SGD phase: the update settings (tiny's epochs and chunk_tokens) and phases go unread
     [f"ttt.{k} has no effect: ttt.phase_prefix_docs is 0 (no global SGD phases)"
      for k in ("epochs=1", "phases=2", "chunk_tokens=4096")]),
    (["train.coprime.queue_depth=4"], ["train.coprime.queue_depth=4 has no effect: train.loader is sequential"]),
    (["ema.enabled=false", "ema.decay=0.5"], ["ema.decay=0.5 has no effect: ema.enabled is false"]),
    (["optim.grad_conditioning.hyper_lr_bias=0.1"],
     ["optim.grad_conditioning.hyper_lr_bias=0.1 has no effect: optim.grad_conditioning.mode is fixed"]),
    (["quant.calibration_batches=3"],
     ["quant.calibration_batches=3 has no effect: no scheme in quant.rules or quant.compare calibrates (GPTQ does)"]),
    (["train.loader=coprime", "train.coprime.queue_depth=4"], []),
])
def test_each_rule_on_tiny(sets, expected):
    assert inert_settings(load_recipe("tiny", ["ttt.enabled=true", *sets])) == expected


def test_check_prints_each_note():
    out = CliRunner().invoke(cli, ["check", "tiny", "--set", "ttt.enabled=true", "--set", "ttt.lora_rank=8"])
    assert out.exit_code == 0, out.output
    assert "note: ttt.lora_rank=8 has no effect: ttt.mode is score_first; only phased_lora reads it\n" \
           f"note: {TAIL}\n" in out.output
