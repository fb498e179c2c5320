"""Issue 13, first step: adding a part is one file. A part declares its settings and registers
itself; its parameters carry roles set where they are created; a trunk refuses what it does not
implement by construction; quantization schemes are one registry with an optional calibration
hook that sees training batches inside the training budget.

Each test registers a throw-away part or scheme (undone afterwards) and drives it through the
real recipe loader, optimizer split, quantization plan and size predictor.

    .venv/bin/python -m pytest -q tests/test_part_mechanism.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_SETS
from torch import nn

from pipeline.config import MAX_WIDTH, ModelConfig, QuantConfig, constrained
from pipeline.errors import UserError
from pipeline.export import codec
from pipeline.export.artifact import tensor_group
from pipeline.export.plan import named_shapes_of, resolve_plan
from pipeline.export.predict import predict_bytes
from pipeline.model import build_model
from pipeline.model.compose import model_config, refusals, scratch
from pipeline.model.parts.attention import zero_init
from pipeline.model.registry import register, settings
from pipeline.model.roles import param_roles, set_roles
from pipeline.optim import build_optimizers
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class AmpConfig:
    init: float = constrained(1.25, ge=0)
    width: int = constrained(0, ge=0, le=MAX_WIDTH)  # 0 = 2 x model_dim


class AmpMLP(nn.Module):
    """relu^2 MLP with a learned per-channel output gain `amp`: a name no pattern ever listed."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = cfg.amp.width or 2 * cfg.model_dim
        self.fc = nn.Linear(cfg.model_dim, hidden, bias=False)
        self.proj = zero_init(nn.Linear(hidden, cfg.model_dim, bias=False))
        self.amp = nn.Parameter(torch.full((cfg.model_dim, 1), cfg.amp.init))  # 2-D: would have gone to Muon
        set_roles(self, control=("amp",))

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)).square()) * self.amp[:, 0]


@pytest.fixture
def amp_part():
    """The one-file part: its settings (model.amp.*) and its registration, undone afterwards."""
    with scratch():
        settings(AmpConfig, section="amp")
        register("mlp", "amp_relu2", reads=("amp",))(lambda cfg, layer_idx: AmpMLP(cfg, layer_idx))
        yield


def test_a_new_part_with_a_gain_gets_the_control_treatment_without_a_pattern(amp_part):
    r = load_recipe("tiny", [*TINY_SETS, "model.mlp=amp_relu2", "model.amp.init=0.5"])
    assert r.model.amp == AmpConfig(init=0.5) and r.model.mlp == "amp_relu2"
    with torch.device("meta"):
        model = build_model(r.model)
    roles = param_roles(model)
    gains = [n for n in roles if n.endswith(".mlp.amp")]
    assert gains == ["blocks.0.mlp.amp", "blocks.1.mlp.amp"] and {roles[n] for n in gains} == {"control"}
    # the optimizer: Adam at scalar_lr, not Muon, although the gain is a 2-D matrix
    groups = {route: [n for n, _ in named] for route, named in model.param_groups().items()}
    assert set(gains) <= set(groups["scalar"]) and not set(gains) & set(groups["matrix"])
    assert "blocks.0.mlp.fc.weight" in groups["matrix"]
    # fp32 by the default plan's first rule (tiny's plan keeps it: control and gate roles), not int6
    # by the `.mlp.` rule
    assert r.quant.rules[0] == QuantConfig().rules[0] and r.quant.rules[0].roles == ("control", "gate")
    plan = {e["name"]: e for e in resolve_plan(named_shapes_of(model), r.quant.rules, roles)}
    assert {plan[n]["scheme"] for n in gains} == {"fp32"} and plan["blocks.0.mlp.fc.weight"]["scheme"] != "fp32"
    # the report groups and the size predictor's constant-ish stand-in
    assert {tensor_group(n, roles[n]) for n in gains} == {"control"}
    pred = predict_bytes(named_shapes_of(model), r.quant.rules, r.package, roles=roles)
    assert pred["control"] > 0 and pred["total"] == sum(v for k, v in pred.items() if k != "total")


def test_the_parts_settings_are_validated_with_its_own_constraints(amp_part):
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["model.mlp=amp_relu2", "model.amp.init=-1", "model.amp.widht=3"])
    msg = str(e.value)
    assert "--set model.amp.init=-1: model.amp.init: must be >= 0 (got -1.0)." in msg
    assert "model.amp.widht: unknown key. Did you mean 'model.amp.width'?" in msg


def test_optimizer_routes_the_gain_to_adam_on_real_weights(amp_part):
    torch.manual_seed(0)
    model = build_model(load_recipe("tiny", [*TINY_SETS, "model.mlp=amp_relu2"]).model)
    opts = build_optimizers(model, load_recipe("tiny").optim)
    adam = next(o for o in opts if o.param_groups[0]["route"] == "scalar")
    assert any(p is model.blocks[0].mlp.amp for p in adam.param_groups[0]["params"])
    assert isinstance(adam, torch.optim.Adam)


def test_roles_survive_copies_casts_and_wrappers():
    """Roles live on the owning module, so what DDP, torch.compile and EMA do to a model keeps them:
    a wrapper prefixes the names (as named_parameters does) and a deepcopy or cast keeps them."""
    import copy

    torch.manual_seed(0)
    model = build_model(load_recipe("sidecar48", ["model.num_layers=3", "model.model_dim=32", "model.num_heads=4",
                                                  "model.num_kv_heads=2", "model.rope.dims=4",
                                                  "model.sidecar.layers=[1, 2]"]).model)
    roles = param_roles(model)
    assert (roles["smear.gate"], roles["sidecar.site_gate"], roles["bigram.scale"]) == ("gate", "matrix", "control")

    class Wrapper(nn.Module):  # what DistributedDataParallel and torch.compile's OptimizedModule look like
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert param_roles(Wrapper(model)) == {f"module.{n}": r for n, r in roles.items()}
    assert param_roles(copy.deepcopy(model).to(torch.float64)) == roles


def test_a_flag_depth_recurrent_does_not_implement_is_refused_at_load():
    with pytest.raises(UserError) as e:
        load_recipe("depth_recurrent", ["model.k_gain=true"])
    assert str(e.value) == ("--set model.k_gain=true: model.k_gain: trunk 'depth_recurrent' does not implement it "
                            "(read by attention 'causal'); remove it or use a trunk that does.")
    with pytest.raises(UserError, match=r"model.attention: trunk 'depth_recurrent' takes no attention part \(it "
                                        r"resolves mlp\)"):
        load_recipe("depth_recurrent", ["model.attention=causal"])
    # a unet_gpt recipe takes it; and a key no part declares is an unknown key, with a did-you-mean
    assert load_recipe("tiny", ["model.k_gain=true"]).model.k_gain is True
    with pytest.raises(UserError, match="model.k_gian: unknown key. Did you mean 'model.k_gain'"):
        load_recipe("depth_recurrent", ["model.k_gian=true"])


def test_a_new_attention_flag_is_refused_by_depth_recurrent_without_any_list():
    @dataclass(frozen=True)
    class Flagged:
        sparkle: bool = False

    with scratch():
        settings(Flagged)
        register("attention", "sparkly", reads=("sparkle",))(lambda cfg, i: None)
        assert load_recipe("tiny", ["model.sparkle=true"]).model.sparkle is True  # unet_gpt resolves attention
        with pytest.raises(UserError, match="model.sparkle: trunk 'depth_recurrent' does not implement it "
                                            r"\(read by attention 'sparkly'\)"):
            load_recipe("depth_recurrent", ["model.sparkle=true"])
        assert set(refusals("depth_recurrent", ["sparkle", "recurrent", "mlp", "rope"])) == {"sparkle"}
    with pytest.raises(UserError, match="model.sparkle: unknown key"):  # gone with its part
        load_recipe("tiny", ["model.sparkle=true"])


def test_configs_built_in_code_are_refused_the_same_way():
    with pytest.raises(UserError, match="model.smear_gate: trunk 'depth_recurrent' does not implement it"):
        model_config(trunk="depth_recurrent", smear_gate=True)
    with pytest.raises(TypeError, match="unknown model key.*did you mean 'smear_gate'"):
        model_config(smear_gat=True)
    cfg = model_config(trunk="depth_recurrent", model_dim=64, num_heads=4, num_kv_heads=2)
    assert cfg.smear_gate is False and cfg.recurrent.k_rank == 32  # every declared setting, at its default


def test_settings_keys_are_unique_and_sections_need_defaults():
    @dataclass(frozen=True)
    class Clash:
        k_gain: bool = False

    @dataclass(frozen=True)
    class NoDefault:
        x: int

    with scratch():
        with pytest.raises(ValueError, match="model.k_gain is already declared by CausalAttentionConfig"):
            settings(Clash)
        with pytest.raises(ValueError, match="model.model_dim is a ModelConfig field"):
            settings(AmpConfig, section="model_dim")
        with pytest.raises(ValueError, match="needs defaults"):
            settings(NoDefault, section="nodefault")


def test_model_identity_is_the_whole_resolved_model_section():
    """Blob header and cache keys hold every declared key, as the YAML would write it (what keeps
    the golden blob's bytes), and a generated script's recipe JSON rebuilds the same config."""
    from pipeline.config import from_dict, to_dict

    r = load_recipe("sidecar48")
    d = to_dict(r.model)
    assert d["k_gain"] is True and d["bigram"] == {"buckets": 2048, "dim": 96, "scale_init": 0.05}
    assert d["sidecar"]["layers"] == [8, 9, 10] and d["recurrent"]["k_rank"] == 32 and "settings" not in d
    back = from_dict(ModelConfig, json.loads(json.dumps(d)))
    assert back == r.model and to_dict(back) == d
    # a part this process does not have (a script carries only its recipe's parts) passes through
    odd = from_dict(ModelConfig, {**d, "future_part": {"x": [1, 2]}})
    assert to_dict(odd)["future_part"] == {"x": [1, 2]}


# ----------------------------------------------------------------------------- quantization schemes


def test_every_scheme_layout_is_what_it_encodes_and_decodes():
    for name, scheme in codec.SCHEMES.items():
        for shape, dtype in (((6, 10), torch.float32), ((7,), torch.float32), ((), torch.float32),
                             ((3, 2, 4), torch.bfloat16), ((4,), torch.int64)):
            if (name == "raw") == dtype.is_floating_point:
                continue
            t = (torch.randn(shape) * 0.1).to(dtype) if dtype.is_floating_point else torch.arange(4)
            # a calibrating scheme (GPTQ) gets the stand-in the size predictor hands it
            stand_in = scheme.stand_in(shape) if scheme.stand_in is not None else None
            entries = codec.quantize_tensor(t, name, name="w", calibration=stand_in)
            layout = scheme.layout("w", tuple(shape), dtype)
            assert [(e.key, e.dtype, e.shape) for e in layout] == [
                (k, v.dtype, list(v.shape)) for k, v in entries.items()], (name, shape)
            assert codec.container_keys("w", name) == [e.key for e in layout]
            back = codec.dequantize_tensor(entries, "w", name, dtype, list(shape))
            assert back.dtype == dtype and back.shape == t.shape
    # raw is for non-float tensors; gptq* live in pipeline/export/gptq.py, loaded by name
    assert codec.selectable_schemes() == ["int6", "int8", "fp16", "fp32", "int5", "int7",
                                          "gptq5", "gptq6", "gptq7", "gptq8"]


def test_an_unknown_scheme_is_refused_at_load_with_a_suggestion():
    with pytest.raises(UserError, match=r"quant.rules.0.scheme: 'int8x' is not a quantization scheme; one of "
                                        r"int6, int8, fp16, fp32, int5, int7, gptq5, .*Did you mean 'int8'\?"):
        load_recipe("tiny", ["quant.rules=[{scheme: int8x}]"])
    with pytest.raises(UserError, match=r"quant.rules.0.roles.0: 'contrl' is not a parameter role.*'control'"):
        load_recipe("tiny", ["quant.rules=[{scheme: fp32, roles: [contrl]}, {scheme: int8}]"])


class _Recorder:
    """A calibrating int8 variant: records what its hook and its encoder receive."""

    def __init__(self):
        self.batches, self.models, self.encoded = [], [], {}

    def calibrate(self, model, batches):
        self.models.append(model)
        for _ in range(3):
            x, y = next(batches)
            self.batches.append((tuple(x.shape), x.dtype, tuple(y.shape), torch.equal(x[:, 1:], y[:, :-1])))
        # one statistic per tensor it will encode: the mean |w| of the trained weights
        return {n: p.detach().abs().mean().reshape(1) for n, p in model.named_parameters() if ".mlp." in n}

    def encode(self, t, *, name, clip_percentile=None, scale_floor=None, calibration=None):
        self.encoded[name] = calibration
        return codec.SCHEMES["int8"].encode(t, name=name, clip_percentile=clip_percentile, scale_floor=scale_floor)


def test_calibration_hook_gets_training_batches_inside_the_training_budget(small_data, tmp_path, monkeypatch):
    from pipeline.distributed import init
    from pipeline.export.calibration import calibrating_schemes
    from pipeline.run import run_recipe

    rec = _Recorder()
    base = codec.SCHEMES["int8"]
    monkeypatch.setitem(codec.SCHEMES, "int8_calib", base._replace(
        name="int8_calib", encode=rec.encode, calibrate=rec.calibrate))
    rules = ("quant.rules=[{scheme: fp32, roles: [control, gate]}, {scheme: int8_calib, pattern: '\\.mlp\\.'}, "
             "{scheme: fp16}]")
    recipe = load_recipe("tiny", [*TINY_SETS, rules, "ttt.enabled=false", "train.max_steps=3"])
    assert calibrating_schemes(recipe) == ["int8_calib"] and calibrating_schemes(load_recipe("tiny")) == []
    lines: list[str] = []
    report = run_recipe(recipe, small_data, tmp_path, init("cpu"), echo=lines.append, code_bytes=0)
    # the hook ran once, on the trained model, with training micro-batches [B, seq_len] (B = 256 / 32)
    assert len(rec.models) == 1 and rec.batches == [((8, 32), torch.int64, (8, 32), True)] * 3
    # each tensor the scheme encoded got its own entry of what the hook returned
    mlp = sorted(n for n in rec.encoded)
    assert mlp == sorted(n for n, _ in rec.models[0].named_parameters() if ".mlp." in n)
    assert all(v is not None and v.shape == (1,) for v in rec.encoded.values())
    # its seconds are training seconds, logged; the blob reads back and is scored
    (train,) = list(tmp_path.glob("tiny/*/seed1337/train/manifest.json"))
    out = json.loads(train.read_text())["outputs"]
    assert 0 < out["calibration_time_s"] < out["train_time_s"]
    assert any(line.startswith("calibration schemes=int8_calib calibration_time_s=") for line in lines)
    assert report["train_time_s"] == out["train_time_s"] and 0 < report["val_bpb"] < 20
