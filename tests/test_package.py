"""Tests for pipeline.export.artifact and pipeline.export.predict: quantize -> package ->
read back from disk -> strict load, byte accounting, the cap gate, corruption handling and
the dry-run size predictor."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from pipeline.config import PackageConfig, QuantConfig, QuantRule
from pipeline.errors import SizeCapError, UserError
from pipeline.export.artifact import load_artifact, package_model, roundtrip_into, size_lines, tensor_group
from pipeline.export.plan import named_shapes_of, quantize_state_dict, resolve_plan
from pipeline.export.predict import predict_bytes, size_vs_rms
from pipeline.model.roles import param_roles, set_roles

pytestmark = pytest.mark.usefixtures("one_thread")


D, VOCAB, LAYERS = 288, 512, 2
FAST = PackageConfig(level=3)  # zstd-3 keeps the tests quick; the format is the same


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_q = nn.Linear(D, D, bias=False)       # 82,944 el. -> int6
        self.c_k = nn.Linear(D, D // 2, bias=False)  # 41,472 el. -> fp16 (small)
        self.c_v = nn.Linear(D, D // 2, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.q_gain = nn.Parameter(torch.full((4,), 1.5))  # control -> fp32
        set_roles(self, control=("q_gain",))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * D, bias=False)
        self.proj = nn.Linear(2 * D, D, bias=False)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = _Attn(), _MLP()
        self.attn_scale = nn.Parameter(torch.ones(D))
        self.mlp_scale = nn.Parameter(torch.ones(D))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(D), torch.zeros(D)]))
        set_roles(self, control=("attn_scale", "mlp_scale", "resid_mix"))


class _Tiny(nn.Module):
    """Names and sizes that hit every default rule: int8 embedding, int6 matrices, fp16
    small matrices, fp32 control tensors, and a raw int64 buffer."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, D)  # 147,456 el. -> int8 with percentile clip
        self.blocks = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.skip_weights = nn.Parameter(torch.ones(1, D))
        set_roles(self, control=("skip_weights",))
        self.register_buffer("steps_seen", torch.tensor([7, 11], dtype=torch.int64))


ROLES = param_roles(_Tiny().to("meta"))  # what the plan reads; independent of the weights


def _gaussian_model(seed=0) -> _Tiny:
    torch.manual_seed(seed)
    m = _Tiny()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name and "skip" not in name:
                p.normal_(0.0, 0.02)
            else:  # control tensors: trained-looking values near their init
                p.add_(0.01 * torch.randn_like(p))
    return m


def _package(tmp_path, model, cfg=FAST, code_bytes=1234, quant=QuantConfig()):
    q = quantize_state_dict(model.state_dict(), quant, roles=ROLES)
    res = package_model(q, tmp_path / "model.bin", cfg, code_bytes, {"recipe": "tiny", "seed": 0})
    return q, res | {"path": str(tmp_path / "model.bin")}


def test_quantize_package_roundtrip_error_bounds(tmp_path):
    model = _gaussian_model()
    sd = model.state_dict()
    q, res = _package(tmp_path, model)
    assert res["bytes_model"] == os.path.getsize(tmp_path / "model.bin")
    assert res["bytes_code"] == 1234 and res["bytes_total"] == res["bytes_model"] + 1234
    back = roundtrip_into(_Tiny, res["path"], res["sha256"]).state_dict()
    _, meta = load_artifact(res["path"])
    assert meta == {"recipe": "tiny", "seed": 0}
    schemes = {e["name"]: e["scheme"] for e in res["plan"]}
    assert schemes["tok_emb.weight"] == "int8" and schemes["blocks.0.attn.c_q.weight"] == "int6"
    assert schemes["blocks.1.attn.c_k.weight"] == "fp16"
    assert schemes["blocks.0.attn_scale"] == "fp32" and schemes["steps_seen"] == "raw"
    for name, w in sd.items():
        got = back[name]
        assert got.dtype == w.dtype and got.shape == w.shape, name
        s = schemes[name]
        if s in ("int6", "int8"):
            half = q.tensors[name + ".scale"].float().unsqueeze(1) / 2
            err = (w - got).abs()
            if s == "int8":  # the bound holds inside the clip; the clip is ~row max here
                clip = torch.quantile(w.abs(), 0.9999984, dim=1, keepdim=True)
                err = torch.where(w.abs() <= clip, err, torch.zeros_like(err))
            assert torch.all(err <= half * (1 + 1e-6)), name
            assert float(err.max()) > 0  # really quantized
        elif s == "fp16":
            assert torch.equal(got, w.half().float()), name
        else:  # fp32 control tensors and the raw buffer: bitwise
            assert torch.equal(got.view(torch.uint8), w.view(torch.uint8)), name


def test_sha_sidecar_determinism_and_size_lines(tmp_path):
    model = _gaussian_model()
    _, a = _package(tmp_path / "a", model)
    _, b = _package(tmp_path / "b", model)
    assert a["sha256"] == b["sha256"] and len(a["sha256"]) == 64
    side = (tmp_path / "a" / "model.bin.sha256").read_text()
    assert side == f"{a['sha256']}  model.bin\n"
    assert sorted(os.listdir(tmp_path / "a")) == ["model.bin", "model.bin.sha256"]  # no temps
    lines = size_lines(a)
    assert lines[0] == f"Serialized model int6_int8+zstd-3: {a['bytes_model']} bytes"
    assert lines[2].endswith(f": {a['bytes_model'] + 1234} bytes")
    g = a["groups"]
    assert g["embed"]["raw_bytes"] == VOCAB * D + VOCAB * 2  # int8 codes + fp16 row scales
    assert g["control"]["raw_bytes"] == 4 * (LAYERS * (D + D + 2 * D + 4) + D)
    assert g["other"]["raw_bytes"] == 16 and g["mlp"]["tensors"] == 2 * LAYERS
    assert 0 < g["attn"]["compressed_bytes"] < g["attn"]["raw_bytes"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_blob_is_a_user_error(tmp_path, damage):
    _, res = _package(tmp_path, _gaussian_model())
    path = res["path"]
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)
    # with a checksum (given, or the sidecar) the mismatch is named ...
    with pytest.raises(UserError, match="checksum mismatch.*corrupted; re-run the export"):
        load_artifact(path, res["sha256"])
    with pytest.raises(UserError, match="checksum mismatch"):
        load_artifact(path)
    # ... and without one, the zstd frame (content size + checksum) still catches it
    os.remove(path + ".sha256")
    with pytest.raises(UserError, match="zstd frame is truncated or corrupt"):
        load_artifact(path)


def test_missing_blob_and_wrong_model(tmp_path):
    with pytest.raises(UserError, match="does not exist; re-run the export"):
        load_artifact(str(tmp_path / "nope.bin"))
    _, res = _package(tmp_path, _gaussian_model())

    class _Other(_Tiny):
        def __init__(self):
            super().__init__()
            self.extra = nn.Parameter(torch.zeros(3))

    with pytest.raises(UserError, match=r"missing \['extra'\]"):
        roundtrip_into(_Other, res["path"], res["sha256"])

    def wider():
        m = _Tiny()
        m.skip_weights = nn.Parameter(torch.ones(1, D + 1))
        return m

    with pytest.raises(UserError, match="does not fit the model"):
        roundtrip_into(wider, res["path"], res["sha256"])


def test_over_cap_raises_and_leaves_no_blob(tmp_path):
    model = _gaussian_model()
    _, ok = _package(tmp_path, model)  # an earlier, stale artifact in the same place
    cap = ok["bytes_model"] + 1000
    tight = dataclasses.replace(FAST, cap_bytes=cap)
    with pytest.raises(SizeCapError) as exc:
        _package(tmp_path, model, cfg=tight, code_bytes=5000)
    msg = str(exc.value)
    assert f"{ok['bytes_model']:,} bytes + code 5,000 bytes = {ok['bytes_model'] + 5000:,}" in msg
    assert f"cap of {cap:,} by 4,000" in msg and "stronger quant plan" in msg
    assert os.listdir(tmp_path) == []
    _, fits = _package(tmp_path, model, cfg=tight, code_bytes=1000)  # exactly at the cap
    assert fits["headroom"] == 0


def test_zlib_mode_roundtrips(tmp_path):
    model = _gaussian_model()
    cfg = PackageConfig(compressor="zlib", level=22)
    rules = (QuantRule(scheme="fp32", pattern=r"attn_scale|mlp_scale|resid_mix|q_gain|skip"),
             QuantRule(scheme="fp16", max_numel=65_536),
             QuantRule(scheme="int8", clip_percentile=99.99984))  # PR #298's export
    q, res = _package(tmp_path, model, cfg=cfg, quant=QuantConfig(rules=rules))
    blob = open(res["path"], "rb").read()
    assert blob[0] == 0x78 and res["label"] == "int8+zlib-9"
    back = roundtrip_into(_Tiny, res["path"], res["sha256"]).state_dict()
    w = model.state_dict()["blocks.0.mlp.fc.weight"]
    half = q.tensors["blocks.0.mlp.fc.weight.scale"].float().unsqueeze(1) / 2
    assert torch.all((back["blocks.0.mlp.fc.weight"] - w).abs() <= half * (1 + 1e-6))


def test_predict_bytes_within_15_percent_of_actual(tmp_path):
    model = _gaussian_model()
    meta = {"recipe": "tiny", "seed": 0}
    # the predictor needs shapes only: a meta-device model (no data) is enough
    shapes = named_shapes_of(_Tiny().to("meta"))
    assert all(isinstance(v[0], tuple) for v in shapes.values())
    q = quantize_state_dict(model.state_dict(), QuantConfig(), roles=ROLES)
    # the deployed setting, zstd-22, on the whole blob
    cfg = PackageConfig()
    res = package_model(q, tmp_path / "model.bin", cfg, 0, meta, group_report=False)
    pred = predict_bytes(shapes, QuantConfig(), cfg, meta=meta, roles=ROLES)
    assert set(pred) == {"embed", "attn", "mlp", "control", "other", "header", "total"}
    assert pred["total"] == sum(v for k, v in pred.items() if k != "total")
    assert pred["other"] == 16  # the int64 buffer, counted raw
    ratio = pred["total"] / res["bytes_model"]
    assert 0.85 <= ratio <= 1.15, (pred, res["bytes_model"])
    # per group (zstd-3 to keep this quick), against each group compressed on its own
    fast = package_model(q, tmp_path / "model.bin", FAST, 0, meta)["groups"]
    pfast = predict_bytes(shapes, QuantConfig(), FAST, meta=meta, roles=ROLES)
    for g in ("embed", "attn", "mlp"):
        assert 0.85 <= pfast[g] / fast[g]["compressed_bytes"] <= 1.15, g
    # a different assumed std changes the estimate (the input is really used)
    small = predict_bytes(shapes, QuantConfig(), FAST, init_std={"tok_emb.weight": 0.0}, roles=ROLES,
                          meta=meta)
    assert small["embed"] < pfast["embed"] / 10


def _floored(quant: QuantConfig) -> QuantConfig:
    """The default plan with PR #684's scale floors (1/31 int6, 1/127 int8)."""
    floors = {"int6": 1 / 31, "int8": 1 / 127}
    return QuantConfig(rules=tuple(dataclasses.replace(r, scale_floor=floors.get(r.scheme)) for r in quant.rules))


def test_size_vs_rms_follows_real_packages_under_a_scale_floor(tmp_path):
    quant = _floored(QuantConfig())
    shapes = named_shapes_of(_Tiny().to("meta"))
    int_names = [e["name"] for e in resolve_plan(shapes, quant.rules, ROLES) if e["scheme"] in ("int6", "int8")]
    actual = {}
    for rms in (0.05, 0.2):
        model = _gaussian_model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in int_names:
                    p.normal_(0.0, rms)
        q = quantize_state_dict(model.state_dict(), quant, roles=ROLES)
        actual[rms] = package_model(q, tmp_path / str(rms) / "model.bin", FAST, 0, {"recipe": "t"},
                                    group_report=False)
        pred = predict_bytes(shapes, quant, FAST, init_std=dict.fromkeys(int_names, rms), roles=ROLES)["total"]
        assert 0.85 <= pred / actual[rms]["bytes_model"] <= 1.15, (rms, pred, actual[rms]["bytes_model"])
    # under the floor the same shapes cost far more bytes at a larger RMS
    assert actual[0.2]["bytes_model"] > 1.2 * actual[0.05]["bytes_model"]

    code = 1000
    cap = (actual[0.05]["bytes_model"] + actual[0.2]["bytes_model"]) // 2 + code
    capped = dataclasses.replace(FAST, cap_bytes=cap)
    curve, cap_rms = size_vs_rms(shapes, quant, capped, code, grid=(0.02, 0.05, 0.2, 0.3), bisect_steps=6,
                                 roles=ROLES)
    totals = [t for _, t in curve]
    assert totals == sorted(totals) and totals[0] < cap < totals[-1]
    assert 0.05 < cap_rms < 0.2
    below = predict_bytes(shapes, quant, capped, init_std=dict.fromkeys(int_names, 0.9 * cap_rms), sample_rows=16,
                          roles=ROLES)
    above = predict_bytes(shapes, quant, capped, init_std=dict.fromkeys(int_names, 1.1 * cap_rms), sample_rows=16,
                          roles=ROLES)
    assert below["total"] + code <= cap < above["total"] + code


def test_size_vs_rms_is_flat_without_a_scale_floor():
    shapes = named_shapes_of(_Tiny().to("meta"))
    curve, cap_rms = size_vs_rms(shapes, QuantConfig(), FAST, 1000, grid=(0.02, 0.3), roles=ROLES)
    (_, small), (_, large) = curve
    assert abs(large - small) < 0.03 * small  # per-row max scaling: the RMS does not matter
    assert cap_rms is None


def test_tensor_groups():
    # by role: embeddings and the head, control and gate tensors (wherever they sit)
    assert tensor_group("tok_emb.weight", "embedding") == "embed"
    assert tensor_group("lm_head.weight", "head") == "embed"
    assert tensor_group("value_embeds.0.weight", "embedding") == "embed"
    assert tensor_group("bigram.scale", "control") == "control"
    assert tensor_group("blocks.3.attn.q_gain", "control") == "control"
    assert tensor_group("blocks.3.attn.new_gate", "gate") == "control"
    # the rest by where it sits
    assert tensor_group("blocks.3.attn.c_q.weight", "matrix") == "attn"
    assert tensor_group("blocks.3.mlp.fc.weight", "matrix") == "mlp"
    assert tensor_group("blocks.3.mlp.fc.bias", "other") == "mlp"
    assert tensor_group("final_norm.weight", "other") == "other"
    assert tensor_group("steps_seen", None) == "other"  # a buffer has no role
