"""Strict recipe loading: dotted-path errors with did-you-mean, all at once; extends; --set
values parsed for their field's type and errors blamed on the flag; declared constraints.

    .venv/bin/python -m pytest -q tests/test_recipe.py
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from pipeline import config as C
from pipeline.errors import UserError
from pipeline.recipe import RECIPES_DIR, load_recipe, parse_set_value

ALL_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name


def test_all_errors_reported_at_once_with_paths_and_did_you_mean():
    with pytest.raises(UserError) as e:
        load_recipe("baseline", ["model.num_layer=3", "train.warmdown_by=stepz", "optim.matrix_lr=fast",
                                 "ema.enabled=1", "model.attention=casual", "quant.rules=[{scheme: int9}]"])
    msg = str(e.value)
    assert "6 problem(s)" in msg
    assert "model.num_layer: unknown key. Did you mean 'model.num_layers'?" in msg
    assert "train.warmdown_by: 'stepz' is not one of 'steps' or 'time'. Did you mean 'steps'?" in msg
    assert "optim.matrix_lr:" in msg and "'fast'" in msg
    assert "ema.enabled: Input should be a valid boolean (got 1)" in msg  # strict: 1 is not a bool
    assert "model.attention: unknown attention 'casual'. Did you mean 'causal'?" in msg
    assert "quant.rules.0.scheme: 'int9'" in msg


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
    assert r.name == "child"  # its own file's: the parent's would file its runs and records under the parent's
    assert (r.model.num_layers, r.model.model_dim, r.train.max_steps) == (5, 64, 5)
    (tmp_path / "named.yaml").write_text("extends: child.yaml\nname: mine\n")
    assert load_recipe(tmp_path / "named.yaml").name == "mine"


@pytest.mark.parametrize("parent", ["tiny", "tiny.yaml"])
def test_extends_reaches_a_built_in_recipe_by_name(tmp_path, parent):
    (tmp_path / "mine.yaml").write_text(f"extends: {parent}\ntrain: {{max_steps: 7}}\n")
    r = load_recipe(tmp_path / "mine.yaml")
    assert (r.name, r.train.max_steps, r.model.model_dim) == ("mine", 7, load_recipe("tiny").model.model_dim)


def test_extends_a_missing_parent_names_both_places(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: tinny\n")
    with pytest.raises(UserError, match=r"extends 'tinny', which is neither a file next to it nor a built-in "
                                        r"recipe \(.*tiny.*\); give a path relative to"):
        load_recipe(tmp_path / "mine.yaml")


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
    with pytest.raises(UserError, match="model.leaky_selective_state: trunk 'unet_gpt' does not implement it "
                                        r"\(read by trunk 'depth_recurrent'\)"):
        load_recipe("tiny", ["model.leaky_selective_state=true"])


def test_bad_rule_patterns_fail_at_load_with_their_paths():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ['quant.rules=[{scheme: int8, pattern: "(("}]',
                             'optim.grad_conditioning.rules=[{pattern: "mlp(", scale: 2.0}]'])
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "quant.rules.0.pattern: '((' is not a valid regular expression" in msg
    assert "optim.grad_conditioning.rules.0.pattern: 'mlp(' is not a valid regular expression" in msg


def test_unknown_mix_normalizer_names_its_field():
    with pytest.raises(UserError, match=r"model\.mix_normalizer: unknown normalizer 'softmx'\. Did you mean 'softmax'"):
        load_recipe("tiny", ["model.mix_normalizer=softmx"])


# ----------------------------------------------------------------------------- shipped recipes

# `pgolf check` params of every shipped recipe (README; PR #684 logged 26,823,765 and PR #298's
# code counts 12,836,767). Constraints must refuse nothing a shipped recipe uses.
PARAMS = {"tiny": 723_216, "baseline": 17_059_912, "sidecar48": 26_823_765, "depth_recurrent": 12_836_767,
          "depth_recurrent_int8_zlib": 12_836_767, "elita": 734_744, "grad_conditioning": 723_216,
          "orthopar": 725_264, "shiftmax_mix": 723_216, "true_evolving": 788_864,
          # the 1.0611 record's logged model_params (pg_mechanics.md §6)
          "frontier": 35_945_671,
          # the card counts 32,814,768; a plain 6 x 256 untied model is 30.47M (seed_components.md §1.1)
          "true_evolving_card": 30_458_816}


def test_every_shipped_recipe_builds_with_its_known_parameter_count():
    import torch

    from pipeline.model import build_model

    assert sorted(PARAMS) == ALL_RECIPES
    for name, count in PARAMS.items():
        with torch.device("meta"):
            assert build_model(load_recipe(name).model).num_params() == count, name


# ----------------------------------------------------------------------------- constraints


def _config_classes():
    """Every dataclass of the recipe schema: pipeline.config's and those the parts declare."""
    from pipeline.recipe import _unwrap, recipe_schema

    seen, todo = [], [recipe_schema()]
    while todo:
        cls = _unwrap(todo.pop())
        if dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls not in seen:
            seen.append(cls)
            todo += list(typing.get_type_hints(cls).values())
    return seen


def test_config_classes_include_the_parts_settings():
    names = {c.__name__ for c in _config_classes()}
    assert {"RopeConfig", "BigramConfig", "SidecarConfig", "RecurrentConfig", "ElitaConfig", "TrueEvolvingConfig",
            "OrthoParConfig", "TrainConfig", "QuantRule"} <= names


def test_every_count_field_declares_its_range():
    """Ints are counts, sizes and indices: each must declare a lower bound where it is declared,
    so a new field is checked at load by declaring it."""
    missing = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            if tp is int or (typing.get_origin(tp) is tuple and args[:1] == (int,)):
                rules = f.metadata.get("constraints", {})
                if "ge" not in rules and "gt" not in rules:
                    missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def test_defaults_satisfy_their_constraints():
    from pipeline.recipe import _constraint_problems, recipe_schema
    from pipeline.recipe_rules import cross_field_problems

    recipe = C.Recipe(name="defaults")
    assert _constraint_problems(C.to_dict(recipe), recipe_schema()) == []  # the model's part settings too
    assert cross_field_problems(recipe, set()) == []
    for cls in _config_classes():  # the optional sections and list items too
        fields = dataclasses.fields(cls)
        if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING for f in fields):
            assert _constraint_problems(C.to_dict(cls()), cls) == [], cls.__name__


def test_a_misspelt_constraint_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="unknown constraint"):
        C.constrained(1, gte=0)


@pytest.mark.parametrize("assignment, message", [
    ("eval.stride=0", "eval.stride: must be >= 1 (got 0)."),
    ("ema.decay=1.0", "ema.decay: must be in [0, 1) (got 1.0)."),
    ("optim.adam_beta2=-0.1", "optim.adam_beta2: must be in [0, 1) (got -0.1)."),
    ("model.vocab_size=70000", "model.vocab_size: must be in [2, 65536] (got 70000); shards store token ids"),
    ("model.sidecar={layers: [2, 2]}", "model.sidecar.layers: items must not repeat (got [2, 2])."),
    ("model.sidecar={layers: []}", "model.sidecar.layers: needs at least 1 item(s)"),
    ("model.sidecar={layers: [-1]}", "model.sidecar.layers.0: must be >= 0 (got -1)."),
    ("quant.rules=[]", "quant.rules: needs at least 1 item(s)"),
    ("quant.rules=[{scheme: int8, clip_percentile: 0}]", "quant.rules.0.clip_percentile: must be in (0, 100]"),
    ("quant.rules=[{scheme: int8, scale_floor: 0}]", "quant.rules.0.scale_floor: must be > 0 (got 0)."),
    ("name=../escape", "name: '../escape' is not allowed; letters, digits and _ . + - only."),
    ("train.max_wallclock_s=inf", "train.max_wallclock_s: must be a finite number (got inf)."),
    ("train.max_steps=9223372036854775808", "train.max_steps: must fit in 64 bits"),
    ("package.level=0", "package.level: must be in [1, 22] (got 0); zstd's levels"),
])
def test_declared_constraints_are_checked_at_load(assignment, message):
    with pytest.raises(UserError) as e:
        load_recipe("tiny", [assignment])
    assert message in str(e.value)


@pytest.mark.parametrize("sets, message", [
    (["train.batch_tokens=4096", "train.reference_world_size=3"],
     "train.batch_tokens (4096) must be a multiple of train.seq_len (128) x train.reference_world_size (3) = 384"),
    (["model.num_heads=3"], "model: model_dim 128 must divide by num_heads 3"),
    (["model.model_dim=36"], "the head dim model_dim / num_heads = 9 must be even"),
    (["model.rope.dims=2", "model.rope.ntk_train_seq_len=64"], "needs rotary dims >= 4 (got 2)"),
    (["model.rope.dims=64"], "model.rope.dims (64) must be even and at most the head dim (32 = model_dim"),
    (["model.attention=true_evolving"], "multi-head only: set model.num_kv_heads = model.num_heads (4), got 2"),
    (["model.mlp_mult=0.001"], "model.mlp_mult: the MLP's hidden width"),
    (["model.mlp=elita_ff2", "model.elita.ff_width=65536", "model.elita.ff_rank=32"], "FeedForward2's hidden width"),
    (["model.sidecar={layers: [3, 4]}"], "layers [4] do not exist; model.num_layers is 4"),
    (["eval.stride=129"], "eval.stride (129) must be at most eval.seq_len (128)"),
    (["data.max_val_tokens=100"], "data.max_val_tokens (100) must be 0 (all) or at least eval.seq_len (128)"),
    (["ttt.chunk_tokens=100"], "ttt.chunk_tokens (100) must be at least eval.seq_len (128)"),
    (["eval.mode=pr298_all_positions"], "score-first TTT needs each scored once"),
    (["ttt.freeze_blocks=5"], "ttt.freeze_blocks (5) is more than the model's 4 blocks (model.num_layers)"),
    (["quant.rules=[{scheme: fp16, clip_percentile: 99.9}]"], "quant.rules.0: clip_percentile applies to int6/int8"),
    (["quant.rules=[{scheme: fp16, min_numel: 10, max_numel: 5}]"], "min_numel (10) > max_numel (5)"),
    (["quant.compare=[{name: a, rules: [{scheme: fp16}]}, {name: a, rules: [{scheme: fp16}]}]"],
     "quant.compare.1.name: 'a' names an earlier plan too"),
    (["train.micro_batch_seqs=3"], "train.micro_batch_seqs (3) must be 0 (off) or divide the 32 sequences"),
])
def test_cross_field_rules_are_checked_at_load(sets, message):
    with pytest.raises(UserError) as e:
        load_recipe("tiny", sets)
    assert message in str(e.value)


def test_ttt_rules_apply_only_when_ttt_runs():
    r = load_recipe("tiny", ["ttt.enabled=false", "ttt.chunk_tokens=1", "eval.mode=pr298_all_positions",
                             "ttt.freeze_blocks=99"])
    assert (r.ttt.chunk_tokens, r.eval.mode) == (1, "pr298_all_positions")


def test_a_cross_field_rule_waits_for_its_fields_own_constraints():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["train.seq_len=0"])  # batch_tokens % 0 would divide by zero
    assert str(e.value) == "--set train.seq_len=0: train.seq_len: must be >= 1 (got 0)."


# ----------------------------------------------------------------------------- --set values and blame


@pytest.mark.parametrize("raw, field, expected", [
    ("on", "train.compile", "on"),
    ("off", "train.compile", "off"),
    ("1e6", "optim.matrix_lr", 1e6),
    ("1E-3", "optim.matrix_lr", 1e-3),
    (".5", "ema.decay", 0.5),
    ("3", "optim.matrix_lr", 3.0),
    ("1_000", "train.max_steps", 1000),
    ("010", "train.max_steps", 10),  # decimal, not YAML 1.1's octal 8
    ("true", "ema.enabled", True),
    ("yes", "ema.enabled", "yes"),  # left for the schema to refuse: only true/false are booleans
    ("123", "description", "123"),
    ("'quoted'", "description", "quoted"),
    ("  spaced  ", "description", "  spaced  "),
    ("null", "data.dir", None),
    ("null", "description", "null"),
    ("[1, 2]", "model.sidecar.layers", [1, 2]),
    ("2026-01-01", "train.max_steps", "2026-01-01"),  # no implicit dates: refused as a string
    ("nan", "optim.matrix_lr", "nan"),
])
def test_set_values_are_parsed_for_their_fields_type(raw, field, expected):
    from pipeline.recipe import _field_type

    value = parse_set_value(raw, _field_type(field.split(".")))
    if isinstance(expected, float):
        assert isinstance(value, float) and value == expected
    elif expected == "nan":
        assert isinstance(value, float) and math.isnan(value)
    else:
        assert value == expected and type(value) is type(expected)


def test_documented_values_load_as_written():
    r = load_recipe("tiny", ["train.compile=on", "optim.matrix_lr=1e6", "ttt.lr=1E-3", "optim.embed_lr=.5"])
    assert (r.train.compile, r.optim.matrix_lr, r.ttt.lr, r.optim.embed_lr) == ("on", 1e6, 1e-3, 0.5)


def test_recipe_files_use_yaml_core_booleans_and_numbers(tmp_path):
    f = tmp_path / "core.yaml"
    f.write_text("extends: " + str(RECIPES_DIR / "tiny.yaml") + "\ntrain: {compile: off}\noptim: {matrix_lr: 2e-2}\n")
    r = load_recipe(f)
    assert (r.train.compile, r.optim.matrix_lr) == ("off", 0.02)
    f.write_text("extends: " + str(RECIPES_DIR / "tiny.yaml") + "\nema: {enabled: yes}\n")
    with pytest.raises(UserError, match=r"core.yaml: ema.enabled: .*\(got 'yes'\) \(write true or false\)"):
        load_recipe(f)


def test_errors_from_a_flag_name_the_flag_not_the_file():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["optim.matrix_lr=abc"])
    msg = str(e.value)
    assert msg.startswith("--set optim.matrix_lr=abc: optim.matrix_lr: ") and "'abc'" in msg
    assert "tiny.yaml" not in msg
    with pytest.raises(UserError) as e:
        load_recipe("tiny", seed=-3)
    assert str(e.value) == "--seed -3: seed: must be in [0, 4294967295] (got -3)."


def test_a_cross_field_error_names_every_flag_involved():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["train.seq_len=100", "optim.matrix_lr=0.1", "train.batch_tokens=250"])
    assert str(e.value).startswith("--set train.batch_tokens=250, --set train.seq_len=100: train.batch_tokens (250)")


def test_errors_from_the_file_name_the_file_and_flags_their_flags(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text("extends: " + str(RECIPES_DIR / "tiny.yaml") + "\ntrain: {log_every: 0}\n")
    with pytest.raises(UserError) as e:
        load_recipe(f, ["eval.batch_seqs=0"])
    lines = str(e.value).splitlines()
    assert lines[0] == "2 problem(s):"
    assert f"  {f}: train.log_every: must be >= 1 (got 0)." in lines
    assert "  --set eval.batch_seqs=0: eval.batch_seqs: must be >= 1 (got 0)." in lines


def test_malformed_set_value_names_the_flag():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["model.sidecar.layers=[1, 2"])
    assert str(e.value).startswith("--set model.sidecar.layers=[1, 2: model.sidecar.layers: not valid YAML")


def test_set_through_a_value_is_refused():
    with pytest.raises(UserError, match=r"--set model.num_layers.x=1: model.num_layers is not a section"):
        load_recipe("tiny", ["model.num_layers.x=1"])


# 10^6 zeros from 170 characters of YAML aliases (the "billion laughs" pattern, scaled down).
BILLION_LAUGHS = ("[&a [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
                  "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], "
                  "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d], [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]]")


@pytest.mark.parametrize("value, fragment", [
    ("!!binary aGk=", "a YAML bytes value"),
    ("!!set {a, b}", "a YAML set value"),
    ("!!timestamp 2026-01-01", "a YAML date value"),
    ("!!float abc", "not valid YAML"),
    ("!!int 0x1f", "not valid YAML"),
    ("&a [*a, *a]", "the value contains itself"),
    (BILLION_LAUGHS, "the value is too large"),
])
def test_yaml_values_that_are_not_recipe_values_are_refused(value, fragment):
    with pytest.raises(UserError) as e:
        load_recipe("tiny", [f"train.max_steps={value}"])
    assert f"--set train.max_steps={value[:90]}" in str(e.value)
    assert fragment in str(e.value)


def test_text_that_is_not_utf8_is_refused():
    with pytest.raises(UserError, match=r"description: .* is not valid UTF-8 text"):
        load_recipe("tiny", ["description=bad \udcff byte"])
    with pytest.raises(UserError, match=r"description: .* contains a NUL character"):
        load_recipe("tiny", ["description=a\x00b"])


def test_a_flag_that_creates_a_section_answers_for_its_defaults():
    # tiny has no sidecar: the flag switches it on with the default sites 8, 9, 10 of 4 layers
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["model.sidecar.hidden=8"])
    assert str(e.value).startswith("--set model.sidecar.hidden=8: model.sidecar.layers [8, 9, 10]: layers")
