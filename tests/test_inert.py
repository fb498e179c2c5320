"""Settings a recipe's own choices never read are named (pipeline.inert), not silently ignored."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import Recipe
from pipeline.inert import RULES, inert_settings
from pipeline.recipe import load_recipe
from pipeline.recipe_files import RECIPES_DIR


def test_every_rule_names_a_real_setting():
    for path in RULES:
        obj = Recipe(name="x")
        for part in path.split("."):
            assert part in {f.name for f in dataclasses.fields(obj)}, path
            obj = getattr(obj, part)


def test_shipped_recipes_set_nothing_they_do_not_read():
    found = {p.stem: inert_settings(load_recipe(p.stem)) for p in sorted(RECIPES_DIR.glob("*.yaml"))}
    # the card turns off the TTT of the recipe it extends: said, and nothing else anywhere
    assert found.pop("true_evolving_card") == ["ttt.epochs=1 is not read: ttt.enabled is false",
                                               "ttt.chunk_tokens=4096 is not read: ttt.enabled is false"]
    assert found and all(v == [] for v in found.values()), found


def test_flipping_frontiers_ttt_mode_names_the_lora_settings_left_behind():
    notes = inert_settings(load_recipe("frontier", ["ttt.mode=score_first"]))
    assert notes == [f"ttt.{k} is not read: ttt.mode is score_first; only phased_lora reads it"
                     for k in ("lora_rank=80", "lora_alpha=144.0", "lora_beta2=0.99", "phase_prefix_docs=2500")]


@pytest.mark.parametrize("sets, expected", [
    (["ttt.lora_rank=8"], ["ttt.lora_rank=8 is not read: ttt.mode is score_first; only phased_lora reads it"]),
    (["ttt.enabled=false", "ttt.lr=0.5"], [f"ttt.{k} is not read: ttt.enabled is false"
                                           for k in ("epochs=1", "lr=0.5", "chunk_tokens=4096")]),
    # score_first with SGD reads momentum, not the Adam betas; pre_score_full_val is always AdamW
    (["ttt.optimizer=sgd", "ttt.beta1=0.5"],
     ["ttt.beta1=0.5 is not read: the TTT optimizer is sgd; only adamw reads it"]),
    (["ttt.mode=pre_score_full_val", "ttt.momentum=0.5"],
     ["ttt.chunk_tokens=4096 is not read: ttt.mode is pre_score_full_val; only score_first or phased_lora reads it",
      "ttt.momentum=0.5 is not read: the TTT optimizer is adamw; only sgd reads it"]),
    (["ttt.mode=phased_lora", "ttt.phase_prefix_docs=0", "ttt.phases=2"],
     # no global SGD phase: the update settings (tiny's epochs and chunk_tokens) and phases go unread
     [f"ttt.{k} is not read: ttt.phase_prefix_docs is 0 (no global SGD phases)"
      for k in ("epochs=1", "phases=2", "chunk_tokens=4096")]),
    (["train.coprime.queue_depth=4"], ["train.coprime.queue_depth=4 is not read: train.loader is sequential"]),
    (["ema.enabled=false", "ema.decay=0.5"], ["ema.decay=0.5 is not read: ema.enabled is false"]),
    (["optim.grad_conditioning.hyper_lr_bias=0.1"],
     ["optim.grad_conditioning.hyper_lr_bias=0.1 is not read: optim.grad_conditioning.mode is fixed"]),
    (["quant.calibration_batches=3"],
     ["quant.calibration_batches=3 is not read: no scheme in quant.rules or quant.compare calibrates (GPTQ does)"]),
    (["train.loader=coprime", "train.coprime.queue_depth=4"], []),
])
def test_each_rule_on_tiny(sets, expected):
    assert inert_settings(load_recipe("tiny", ["ttt.enabled=true", *sets])) == expected


def test_check_prints_each_note():
    out = CliRunner().invoke(cli, ["check", "tiny", "--set", "ttt.enabled=true", "--set", "ttt.lora_rank=8"])
    assert out.exit_code == 0, out.output
    assert "note: ttt.lora_rank=8 is not read: ttt.mode is score_first; only phased_lora reads it\n" in out.output
