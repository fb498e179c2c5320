"""Strict recipe loading: dotted-path errors with did-you-mean, all at once; extends; --set.

    .venv/bin/python -m pytest -q tests/test_recipe.py
"""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import RECIPES_DIR, load_recipe

ALL_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name


def test_all_errors_reported_at_once_with_paths_and_did_you_mean():
    with pytest.raises(UserError) as e:
        load_recipe("baseline", ["model.num_layer=3", "train.warmdown_by=stepz", "optim.matrix_lr=fast",
                                 "ema.enabled=1", "model.attention=casual", "quant.rules=[{scheme: int7}]"])
    msg = str(e.value)
    assert "6 problem(s)" in msg
    assert "model.num_layer: unknown key. Did you mean 'model.num_layers'?" in msg
    assert "train.warmdown_by: 'stepz' is not one of 'steps' or 'time'. Did you mean 'steps'?" in msg
    assert "optim.matrix_lr:" in msg and "'fast'" in msg
    assert "ema.enabled: Input should be a valid boolean (got 1)" in msg  # strict: 1 is not a bool
    assert "model.attention: unknown attention 'casual'. Did you mean 'causal'?" in msg
    assert "quant.rules.0.scheme: 'int7'" in msg


def test_strict_types_reject_strings_for_numbers():
    with pytest.raises(UserError, match=r"train.max_steps: .*got '10'"):
        load_recipe("tiny", ["train.max_steps='10'"])


def test_overrides_parse_yaml_values_and_create_optional_sections():
    r = load_recipe("tiny", ["train.max_steps=7", "model.bigram.buckets=64", "model.sidecar.layers=[1,2]",
                             "ttt.enabled=false"], seed=5)
    assert r.train.max_steps == 7 and r.seed == 5 and r.ttt.enabled is False
    assert r.model.bigram.buckets == 64 and r.model.bigram.dim == 96
    assert r.model.sidecar.layers == (1, 2)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="expected dotted.key=value"):
        load_recipe("tiny", ["train.max_steps"])


def test_extends_composes_and_child_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nmodel: {num_layers: 3, model_dim: 64, num_heads: 4}\n"
                                        "train: {max_steps: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {num_layers: 5}\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert r.name == "base"  # inherited; a child without a name keeps its parent's
    assert (r.model.num_layers, r.model.model_dim, r.train.max_steps) == (5, 64, 5)


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel:\n  num_layers: [1, 2\n")
    with pytest.raises(UserError, match=r"malformed YAML in .*bad.yaml:\d+:\d+"):
        load_recipe(bad)


def test_unknown_recipe_name_suggests():
    with pytest.raises(UserError, match="Did you mean 'baseline'"):
        load_recipe("baselin")


def test_cross_field_rules():
    with pytest.raises(UserError, match="batch_tokens .* multiple of train.seq_len"):
        load_recipe("tiny", ["train.batch_tokens=1000"])
    with pytest.raises(UserError, match="leaky_selective_state: only meaningful"):
        load_recipe("tiny", ["model.leaky_selective_state=true"])


def test_bad_rule_patterns_fail_at_load_with_their_paths():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ['quant.rules=[{scheme: int8, pattern: "(("}]',
                             'optim.grad_conditioning.rules=[{pattern: "mlp(", scale: 2.0}]'])
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "quant.rules[0] pattern '(('" in msg
    assert "optim.grad_conditioning.rules[0].pattern 'mlp('" in msg


def test_unknown_mix_normalizer_names_its_field():
    with pytest.raises(UserError, match=r"model\.mix_normalizer: unknown normalizer 'softmx'\. Did you mean 'softmax'"):
        load_recipe("tiny", ["model.mix_normalizer=softmx"])
