"""`pgolf check`'s model figures of every shipped recipe, pinned: params=, params_<scheme>= and
predicted_bytes_<group>= / predicted_bytes_model= (the predictor is seeded: the same model and
plan, the same bytes). They were recorded before issue 13 moved part settings out of ModelConfig
and routing from name patterns to parameter roles, and must not move when the mechanism behind
them changes. Code bytes are not pinned: they change with any runtime module.

A recipe added, or a change that moves a figure on purpose, re-records the fixture (and says why):

    PGOLF_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_check_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.export.predict import model_figures
from pipeline.model import build_model
from pipeline.recipe import RECIPES_DIR, load_recipe

FIXTURE = Path(__file__).parent / "golden" / "check_recipes.json"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
UPDATE = bool(os.environ.get("PGOLF_UPDATE_GOLDEN"))


def figures(name: str) -> dict[str, int]:
    r = load_recipe(name)
    with torch.device("meta"):
        model = build_model(r.model)
    return model_figures(model, r.quant, r.package)  # with quant.lqer, as `pgolf check` predicts


def _golden() -> dict:
    return json.loads(FIXTURE.read_text())


def test_every_recipe_is_pinned():
    if UPDATE:
        pytest.skip("re-recording")
    assert sorted(_golden()["recipes"]) == RECIPES, "re-record the fixture (see the module docstring)"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", RECIPES)
def test_check_figures_are_unchanged(name):
    got = figures(name)
    if UPDATE:
        doc = _golden()
        doc["recipes"][name] = got
        FIXTURE.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    pinned = _golden()["recipes"].get(name)
    assert pinned is not None, f"{name} is not pinned; re-record the fixture (see the module docstring)"
    assert got == pinned
