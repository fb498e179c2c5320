"""Tests for pipeline.export.codec (scheme math, codecs, hand-written container parser) and
pipeline.export.plan (plan resolution)."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import zlib

import pytest
import safetensors.torch
import torch
import zstandard

import pipeline.export.codec as quant
from pipeline.config import QuantConfig, QuantRule
from pipeline.errors import UserError
from pipeline.export.codec import (ArtifactError, compress, decode_container, decompress,
                            dequantize_tensor, parse_container, quantize_tensor, row_quantile)
from pipeline.export.plan import quantize_state_dict, resolve_plan

F16_EPS = 2.0 ** -11  # fp16 relative rounding of a stored scale


def _roundtrip(t, scheme, clip=None):
    parts = quantize_tensor(t, scheme, clip, "w")
    return parts, dequantize_tensor(parts, "w", scheme, t.dtype, list(t.shape))


def test_runtime_module_imports_only_allowed_packages():
    tree = ast.parse(open(quant.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    # pipeline only for the optional UserError base (guarded by try/except ImportError)
    assert roots <= {"__future__", "importlib", "json", "math", "struct", "typing", "zlib", "numpy", "torch",
                     "zstandard", "pipeline"}, roots


def test_runtime_module_works_without_the_package(monkeypatch):
    # Bundled into the submission script there is no pipeline.errors: the reader must still
    # load (errors become ValueError) and decode a container.
    monkeypatch.setitem(sys.modules, "pipeline.errors", None)  # makes the import fail
    spec = importlib.util.spec_from_file_location("standalone_quant", quant.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.ArtifactError.__mro__[1] is ValueError
    doc = {"format": "pgolf-quant", "version": 1, "meta": {},
           "tensors": {"x": {"scheme": "fp32", "dtype": "float32", "shape": [2]}}}
    sd, _ = mod.decode_artifact(mod.compress(_container(doc), "zstd", 3))
    assert torch.equal(sd["x"], torch.ones(2))


def test_int6_per_row_error_bound_and_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g) * torch.logspace(-4, 0, 16).unsqueeze(1)
    w[3] = 0.0  # a zero row must survive
    parts, back = _roundtrip(w, "int6")
    q, scale = parts["w.q"], parts["w.scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (16,)
    assert int(q.min()) >= -32 and int(q.max()) <= 31
    # scale is row max / 31 up to fp16 rounding (or the floor for tiny rows)
    ref = (w.abs().amax(1) / 31).clamp_min(torch.finfo(torch.float16).tiny)
    assert torch.allclose(scale.float(), ref, rtol=F16_EPS, atol=0)
    err = (w - back).abs().amax(1)
    assert torch.all(err <= scale.float() / 2 * (1 + 1e-6) + 1e-12)
    assert torch.all(back[3] == 0)
    # the largest element of each row maps to ±31, except rows whose scale hit the floor
    # (the floor keeps them within scale/2 but with fewer levels)
    floored = ref == torch.finfo(torch.float16).tiny
    assert 0 < int(floored.sum()) < 16
    assert torch.all(q.abs().amax(1)[~floored] == 31)
    assert torch.all(q.abs().amax(1)[floored] < 31)


def test_int6_nd_tensor_flattens_rows_and_restores_dtype():
    w = (torch.randn(4, 3, 5) * 0.02).to(torch.bfloat16)
    parts, back = _roundtrip(w, "int6")
    assert parts["w.q"].shape == (4, 3, 5) and parts["w.scale"].shape == (4,)
    assert back.dtype == torch.bfloat16 and back.shape == w.shape
    bound = parts["w.scale"].float().view(4, 1, 1) / 2
    # bf16 output adds its own rounding (8 mantissa bits) on top of the quantization error
    assert torch.all((w.float() - back.float()).abs() <= bound + w.float().abs() * 2 ** -8)


def test_int8_percentile_clip_matches_quantile_and_bounds():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1000, generator=g)
    w[0, 0] = 50.0  # an outlier the 99th percentile clip must cut
    parts, back = _roundtrip(w, "int8", clip=99.0)
    clip = torch.quantile(w.abs(), 0.99, dim=1)
    scale = parts["w.scale"].float()
    assert torch.allclose(scale, clip / 127, rtol=F16_EPS, atol=0)
    q = parts["w.q"]
    assert int(q.abs().max()) <= 127
    inside = w.abs() <= clip.unsqueeze(1)
    err = (w - back).abs()
    assert torch.all(err[inside] <= (scale.unsqueeze(1) / 2).expand_as(w)[inside] * (1 + 1e-6))
    # the outlier is clipped to about the clip value (127 * scale), not kept
    assert abs(float(back[0, 0]) - float(127 * scale[0])) < 1e-5


def test_record_scale_floor_reproduces_the_records_formula():
    # The records' int6: scale = (rowmax/31).clamp_min(1/31) in fp16 (PR #198 lineage)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    w[0] *= 10  # one row above the floor
    parts = quantize_tensor(w, "int6", None, "w", scale_floor=1 / 31)
    ref_scale = (w.abs().amax(1) / 31).clamp_min(1 / 31).half()
    assert torch.equal(parts["w.scale"], ref_scale)
    ref_q = torch.clamp(torch.round(w / ref_scale.float()[:, None]), -32, 31).to(torch.int8)
    assert torch.equal(parts["w.q"], ref_q)


def test_row_quantile_equals_torch_quantile_across_chunks():
    a = torch.rand(37, 129, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.5, 0.9999984, 1.0):
        ours = row_quantile(a, q, chunk_elems=500)  # forces several chunks
        assert torch.allclose(ours, torch.quantile(a, q, dim=1), rtol=1e-6, atol=1e-7)


def test_one_d_tensors_get_a_single_fp32_scale():
    w = torch.tensor([0.5, -1.0, 0.25, 0.0])
    parts, back = _roundtrip(w, "int8")
    assert parts["w.scale"].dtype == torch.float32 and parts["w.scale"].shape == ()
    assert float(parts["w.scale"]) == pytest.approx(1.0 / 127)
    assert torch.all((w - back).abs() <= 0.5 / 127 + 1e-7)
    parts, back = _roundtrip(torch.zeros(5), "int6")
    assert torch.all(back == 0)


def test_float_casts_and_raw_passthrough_are_exact():
    w = torch.randn(10, 3, dtype=torch.float64)
    _, b16 = _roundtrip(w, "fp16")
    assert b16.dtype == torch.float64 and torch.equal(b16, w.to(torch.float16).to(torch.float64))
    w32 = torch.randn(7)
    _, b32 = _roundtrip(w32, "fp32")
    assert torch.equal(b32.view(torch.int32), w32.view(torch.int32))  # bitwise
    ints = torch.arange(-5, 5, dtype=torch.int64)
    parts, back = _roundtrip(ints, "raw")
    assert back.dtype == torch.int64 and torch.equal(back, ints)
    assert parts["w"].data_ptr() != ints.data_ptr()  # a copy, never shared storage


def _mixed_tensors():
    return {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 2).to(torch.bfloat16), "i8": torch.randint(-128, 127, (6,),
                                                                          dtype=torch.int8),
        "i64": torch.tensor([1, -2, 3]), "boolean": torch.tensor([[True, False]]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "u8": torch.arange(4).byte(),
    }


def test_hand_parser_equals_safetensors_loader():
    tensors = _mixed_tensors()
    buf = safetensors.torch.save(tensors, metadata={"k": "v", "pgolf_quant": "{}"})
    ours, meta = parse_container(buf)
    theirs = safetensors.torch.load(buf)
    assert meta == {"k": "v", "pgolf_quant": "{}"}
    assert set(ours) == set(theirs) == set(tensors)
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), k
    ours["f32"].add_(1.0)  # tensors own writable memory; the blob is untouched
    assert torch.equal(parse_container(buf)[0]["f32"], theirs["f32"])


def test_parser_rejects_truncation_and_garbage():
    buf = safetensors.torch.save(_mixed_tensors())
    with pytest.raises(ArtifactError, match="truncated"):
        parse_container(buf[:20])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        parse_container(buf[:-3])  # header intact, data short
    with pytest.raises(ArtifactError, match="not valid JSON"):
        parse_container(b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{")
    assert issubclass(ArtifactError, UserError)


def _container(meta_doc):
    return safetensors.torch.save({"x": torch.ones(2)},
                                  metadata={"pgolf_quant": json.dumps(meta_doc)})


def test_reader_refuses_unknown_format_and_newer_version():
    good = {"format": "pgolf-quant", "version": 1, "meta": {"recipe": "r"},
            "tensors": {"x": {"scheme": "fp32", "dtype": "float32", "shape": [2]}}}
    sd, doc = decode_container(_container(good))
    assert torch.equal(sd["x"], torch.ones(2)) and doc["meta"] == {"recipe": "r"}
    with pytest.raises(ArtifactError, match="version 2.*up to version 1"):
        decode_container(_container({**good, "version": 2}))
    with pytest.raises(ArtifactError, match="format is 'other'"):
        decode_container(_container({**good, "format": "other"}))
    with pytest.raises(ArtifactError, match="not a pgolf-quant blob"):
        decode_container(safetensors.torch.save({"x": torch.ones(2)}))
    with pytest.raises(ArtifactError, match="not in its manifest"):
        decode_container(_container({**good, "tensors": {}}))


def test_zstd_blob_is_a_standard_frame():
    raw = bytes(range(256)) * 300
    blob = compress(raw, "zstd", 19)
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    assert zstandard.frame_content_size(blob) == len(raw)
    assert zstandard.ZstdDecompressor().decompress(blob) == raw  # no max_output_size needed
    assert decompress(blob) == raw
    if shutil.which("zstd"):  # the command-line tool reads it too
        out = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True)
        assert out.stdout == raw


def test_zlib_codec_and_level_cap():
    raw = b"parameter golf " * 1000
    blob = compress(raw, "zlib", 22)  # zstd-style level means zlib's maximum, 9
    assert blob == zlib.compress(raw, 9)
    assert decompress(blob) == raw
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        decompress(blob[:-5])
    with pytest.raises(ArtifactError, match="neither a zstd frame nor a zlib stream"):
        decompress(b"PK\x03\x04junk")


def test_resolve_plan_default_rules_pick_each_scheme():
    shapes = {
        "blocks.0.attn.c_q.weight": ((512, 512), torch.float32),   # 262,144 -> int6
        "blocks.0.mlp.fc.weight": ((1024, 512), torch.bfloat16),   # int6
        "tok_emb.weight": ((1024, 128), torch.float32),           # 131,072 -> int8 (clip)
        "blocks.0.attn.c_k.weight": ((256, 256), torch.float32),  # exactly 65,536 -> fp16
        "bigram.proj.weight": ((257, 256), torch.float32),        # 65,792 -> int8
        "blocks.0.attn_scale": ((512,), torch.float32),           # control -> fp32
        "blocks.0.attn.q_gain": ((8,), torch.float32),            # control -> fp32
        "rotary.steps": ((4,), torch.int64),                       # non-float -> raw
        "blocks.0.new_part.w_gain": ((512,), torch.float32),       # control by role, no name pattern -> fp32
    }
    roles = {"blocks.0.attn.c_q.weight": "matrix", "blocks.0.mlp.fc.weight": "matrix", "tok_emb.weight": "embedding",
             "blocks.0.attn.c_k.weight": "matrix", "bigram.proj.weight": "matrix", "blocks.0.attn_scale": "control",
             "blocks.0.attn.q_gain": "control", "blocks.0.new_part.w_gain": "gate"}  # the buffer has no role
    plan = resolve_plan(shapes, QuantConfig(), roles)
    got = {e["name"]: (e["scheme"], e["rule_index"]) for e in plan}
    assert got == {
        "blocks.0.attn.c_q.weight": ("int6", 2), "blocks.0.mlp.fc.weight": ("int6", 2),
        "tok_emb.weight": ("int8", 3), "blocks.0.attn.c_k.weight": ("fp16", 1),
        "bigram.proj.weight": ("int8", 3), "blocks.0.attn_scale": ("fp32", 0),
        "blocks.0.attn.q_gain": ("fp32", 0), "rotary.steps": ("raw", None), "blocks.0.new_part.w_gain": ("fp32", 0),
    }
    assert {e["name"]: e["role"] for e in plan} == {**roles, "rotary.steps": None}
    # the default plan's first rule names roles: without them it cannot be resolved
    with pytest.raises(ValueError, match="pass roles="):
        resolve_plan(shapes, QuantConfig())
    assert [e["name"] for e in plan] == list(shapes)  # order preserved
    assert next(e for e in plan if e["name"] == "tok_emb.weight")["clip_percentile"] == 99.99984
    assert json.loads(json.dumps(plan)) == plan  # JSON-able as is


def test_resolve_plan_numel_bounds_and_errors():
    rules = (QuantRule(scheme="fp16", pattern=r"^a", min_numel=10, max_numel=20),)
    plan = resolve_plan({"a1": ((10,), "float32"), "a2": ((20,), "torch.float32")}, rules)
    assert [e["scheme"] for e in plan] == ["fp16", "fp16"]
    with pytest.raises(UserError, match=r"'a3' \(shape \[21\].*catch-all"):
        resolve_plan({"a3": ((21,), torch.float32)}, rules)
    with pytest.raises(UserError, match="not a valid regular expression"):
        resolve_plan({"a": ((1,), torch.float32)}, (QuantRule(scheme="int8", pattern="("),))
    with pytest.raises(UserError, match="clipping only applies to int6/int8"):
        resolve_plan({}, (QuantRule(scheme="fp16", clip_percentile=99.0),))
    with pytest.raises(UserError, match="quant.rules is empty"):
        resolve_plan({}, ())


def test_quantize_state_dict_refuses_nan_and_name_clashes():
    with pytest.raises(UserError, match="'w' contains NaN"):
        quantize_state_dict({"w": torch.tensor([1.0, float("nan")])}, QuantConfig(), roles={"w": "other"})
    rules = (QuantRule(scheme="int8", pattern="^w$"), QuantRule(scheme="fp32"))
    with pytest.raises(UserError, match="collides"):
        quantize_state_dict({"w": torch.ones(2, 2), "w.q": torch.ones(2)}, rules)


def test_hand_written_container_is_read_identically_by_safetensors():
    """The one container writer (no safetensors needed at run time) is real safetensors."""
    import safetensors.torch

    from pipeline.export.codec import encode_container, parse_container

    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(5, 7, generator=g), "a.q": torch.randint(-32, 32, (4, 3), dtype=torch.int8),
               "c.h": torch.randn(9, generator=g).half(), "d.bf": torch.randn(2, 2, generator=g).bfloat16(),
               "e.i": torch.arange(6, dtype=torch.int64), "f.s": torch.tensor(3.5)}
    meta = {"k": "v"}
    buf = encode_container(tensors, meta)
    assert buf == encode_container(dict(reversed(list(tensors.items()))), meta)  # order-independent bytes
    loaded = safetensors.torch.load(buf)
    ours, ours_meta = parse_container(buf)
    assert ours_meta == meta
    assert set(loaded) == set(tensors) == set(ours)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t)


def test_scale_floor_rule_reproduces_the_pr_formula():
    from pipeline.config import QuantRule
    from pipeline.export.plan import quantize_state_dict

    w = torch.full((2, 8), 0.1)
    w[1] = 0.5
    floored = quantize_state_dict({"blocks.0.attn.c_q.weight": w}, (QuantRule(scheme="int6", scale_floor=1 / 31),))
    free = quantize_state_dict({"blocks.0.attn.c_q.weight": w}, (QuantRule(scheme="int6"),))
    # With the PR's floor both rows use step 1/31: 0.1 -> round(3.1) = 3, 0.5 -> round(15.5) = 16.
    assert floored.tensors["blocks.0.attn.c_q.weight.q"][:, 0].tolist() == [3, 16]
    # Without it each row uses its own max: every code is 31.
    assert free.tensors["blocks.0.attn.c_q.weight.q"][:, 0].tolist() == [31, 31]
