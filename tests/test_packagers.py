"""Issue 13 item 4: the brotli, byte-shuffled brotli and per-group lrzip packagers
(pipeline/export/packagers.py) beside zstd-22, and the export stage's size comparison.

Each must give back the container bytes exactly, be recognised from the blob's first bytes by
codec.decompress, refuse a damaged blob with an ArtifactError, and ship in the generated script
only when a recipe uses it. pergroup needs the `lrzip` program: its tests skip where it is absent,
except the one that checks the refusal that names the fix.

    .venv/bin/python -m pytest -q tests/test_packagers.py
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import brotli
import pytest
import torch
from conftest import TINY_SETS

from pipeline.config import LqerConfig, PackageConfig, QuantConfig, QuantRule
from pipeline.errors import UserError
from pipeline.export import codec, packagers
from pipeline.export.artifact import load_artifact, package_model, serialize
from pipeline.export.codec import ArtifactError, compress, decompress
from pipeline.export.plan import quantize_state_dict
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="the lrzip program is not installed")


def _qmodel(layers: int = 3):
    g = torch.Generator().manual_seed(0)
    state = {"tok_emb.weight": torch.randn(64, 32, generator=g) * 0.05}
    for i in range(layers):
        state[f"blocks.{i}.attn.c_q.weight"] = torch.randn(32, 32, generator=g) * 0.05
        state[f"blocks.{i}.mlp.fc.weight"] = torch.randn(96, 32, generator=g) * 0.05
        state[f"blocks.{i}.attn_scale"] = torch.ones(32)
    rules = (QuantRule(scheme="fp32", max_numel=32), QuantRule(scheme="int6", pattern=r"\.(attn|mlp)\."),
             QuantRule(scheme="int8"))
    return state, quantize_state_dict(state, QuantConfig(rules=rules, lqer=LqerConfig(rank=2, top_k=1)))


def test_brotli_and_byte_shuffle_roundtrip_and_are_recognised():
    _, q = _qmodel()
    raw = serialize(q, {"recipe": "t"})
    plain, shuffled = compress(raw, "brotli", 22), compress(raw, "brotli_shuffle", 22)
    assert decompress(plain) == raw and decompress(shuffled) == raw
    assert brotli.decompress(plain) == raw  # a plain brotli stream: `brotli -d` reads it
    inner = brotli.decompress(shuffled)  # the records' layout inside the stream
    assert inner[:5] == b"BSHF\x02" and inner[5:] == raw[0::2] + raw[1::2]
    assert packagers.byte_unshuffle(packagers.byte_shuffle(raw[:-1])) == raw[:-1]  # odd lengths too
    # a 2**24 window: the first byte's low nibble is 0xF, never a zlib header's 8
    for payload in (b"", b"x", raw, bytes(range(256)) * 64):
        for kind in ("brotli", "brotli_shuffle"):
            assert compress(payload, kind)[0] & 0x0F == 0x0F
    assert compress(raw, "brotli", 5) != plain  # the level is brotli's quality, min(level, 11)
    assert decompress(compress(raw, "zstd")) == raw and decompress(zlib.compress(raw)) == raw


def test_damaged_brotli_blobs_are_refused():
    _, q = _qmodel()
    blob = compress(serialize(q, {}), "brotli_shuffle")
    with pytest.raises(ArtifactError, match="neither a zstd frame nor a zlib stream.*brotli stream either"):
        decompress(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="neither a zstd frame nor a zlib stream"):
        decompress(b"PK\x03\x04junk")
    with pytest.raises(ArtifactError, match="bad BSHF header"):
        packagers.byte_unshuffle(b"BSHF\x00abc")


@needs_lrzip
def test_pergroup_roundtrips_the_container_exactly():
    _, q = _qmodel()
    raw = serialize(q, {"recipe": "t"})
    blob = packagers.pergroup_compress(raw, 9, min_group_bytes=0)
    assert blob[:4] == b"PGRP" and decompress(blob) == raw
    (count,) = struct.unpack_from("<I", blob, 4)
    head = brotli.decompress(blob[8 + 4 * count:8 + 4 * count + struct.unpack_from("<I", blob, 8)[0]])
    groups = json.loads(head[4:4 + struct.unpack_from("<I", head, 0)[0]])["groups"]
    # the int8 code matrices by kind across layers, in layer order; scales and LQER factors stay behind
    assert groups == [["blocks.0.attn.c_q.weight.q", "blocks.1.attn.c_q.weight.q", "blocks.2.attn.c_q.weight.q"],
                      ["blocks.0.mlp.fc.weight.q", "blocks.1.mlp.fc.weight.q", "blocks.2.mlp.fc.weight.q"],
                      ["tok_emb.weight.q"]]
    assert count == 1 + len(groups)
    # the default threshold keeps small groups in the brotli remainder
    small = compress(raw, "pergroup")
    assert decompress(small) == raw and struct.unpack_from("<I", small, 4)[0] < count
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        decompress(blob[:-7])
    with pytest.raises(ValueError, match="pgolf-quant container"):
        packagers.pergroup_compress(b"\x00" * 3)


def test_pergroup_without_lrzip_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "")
    _, q = _qmodel()
    with pytest.raises(UserError, match="needs the lrzip program.*apt-get install lrzip"):
        packagers.pergroup_compress(serialize(q, {}), 9, min_group_bytes=0)


@pytest.mark.parametrize("compressor", ["brotli", "brotli_shuffle",
                                        pytest.param("pergroup", marks=needs_lrzip)])
def test_every_packager_writes_a_blob_that_reads_back_like_zstd(tmp_path, compressor):
    _, q = _qmodel()
    ref = package_model(q, tmp_path / "zstd.bin", PackageConfig(), 0, meta={"recipe": "t"})
    out = package_model(q, tmp_path / "other.bin", PackageConfig(compressor=compressor), 0, meta={"recipe": "t"})
    assert out["label"].endswith(f"+{compressor}-{11 if compressor.startswith('brotli') else 9}")
    assert out["bytes_model"] == (tmp_path / "other.bin").stat().st_size != ref["bytes_model"]
    a, _ = load_artifact(tmp_path / "zstd.bin", ref["sha256"])
    b, _ = load_artifact(tmp_path / "other.bin", out["sha256"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_recipes_that_use_them_carry_the_export_extensions():
    from pipeline.codegen import export_modules, runtime_modules

    tiny = load_recipe("tiny")
    assert export_modules(tiny) == []
    shipped = runtime_modules(tiny)
    assert not {"pipeline/export/gptq.py", "pipeline/export/lqer.py", "pipeline/export/packagers.py"} & set(shipped)
    rich = load_recipe("tiny", ["quant.rules=[{scheme: fp32, roles: [control, gate]}, {scheme: gptq6, "
                                "pattern: '\\.mlp\\.'}, {scheme: int7}]", "quant.lqer={rank: 4, top_k: 3}",
                                "package.compressor=brotli_shuffle"])
    assert export_modules(rich) == ["pipeline.export.gptq", "pipeline.export.lqer", "pipeline.export.packagers"]
    assert {"pipeline/export/gptq.py", "pipeline/export/lqer.py", "pipeline/export/packagers.py"} <= \
        set(runtime_modules(rich))
    compared = load_recipe("tiny", ["package.compare_compressors=[brotli]"])
    assert export_modules(compared) == ["pipeline.export.packagers"]


def test_the_export_stage_compares_compressors_on_the_same_blob(small_data, tmp_path):
    from pipeline.distributed import init
    from pipeline.run import run_recipe

    sets = [*TINY_SETS, "ttt.enabled=false", "train.max_steps=4", "package.compressor=brotli_shuffle",
            "quant.rules=[{scheme: fp32, roles: [control, gate]}, {scheme: int6, pattern: '\\.(attn|mlp)\\.'}, "
            "{scheme: int8}]", "quant.lqer={rank: 2, top_k: 2}", "package.compare_compressors=[zstd, brotli, pergroup]"]
    lines: list[str] = []
    report = run_recipe(load_recipe("tiny", sets), small_data, tmp_path, init("cpu"), echo=lines.append,
                        code_bytes=0)
    (blob,) = list(tmp_path.glob("tiny/*/seed1337/export/model.bin"))
    sd, doc = codec.decode_artifact(blob.read_bytes())
    assert sum(m["scheme"].endswith("+lqer2") for m in doc["tensors"].values()) == 2
    raw = codec.decompress(blob.read_bytes())
    compare = report["bytes_model_compare"]
    assert compare["compressor:zstd"] == len(compress(raw, "zstd", 22))
    assert compare["compressor:brotli"] == len(compress(raw, "brotli", 22))
    assert report["bytes_model"] == blob.stat().st_size == len(compress(raw, "brotli_shuffle", 22))
    for name in ("zstd-22", "brotli-11"):
        assert any(line.startswith(f"Compare compressor {name}: model ") and "compress_s=" in line for line in lines)
    if shutil.which("lrzip"):
        assert any(line.startswith("Compare compressor pergroup-9: model ") for line in lines)
        assert compare["compressor:pergroup"] > 0
    else:
        assert any("Compare compressor pergroup: unavailable" in line for line in lines)
    assert 0 < report["val_bpb"] < 20


@pytest.mark.slow  # ~1 minute: generates, minifies and runs a whole train_gpt.py
def test_the_shipped_script_quantizes_and_reads_back_gptq_lqer_brotli(small_data, tmp_path):
    # The generated train_gpt.py imports the scheme and packager modules by name: it must carry them,
    # calibrate inside training, and decode its own blob with only the allowed packages (+ brotli).
    import os
    import re
    import subprocess
    import sys

    from conftest import tiny_recipe
    from test_codegen import filtered_site_packages

    from pipeline.codegen import unpack_train_gpt, write_train_gpt

    recipe = tiny_recipe("train.max_steps=3", "ttt.enabled=false", "quant.calibration_batches=2",
                         "quant.rules=[{scheme: fp32, roles: [control, gate]}, "
                         "{scheme: gptq6, pattern: '\\.(attn|mlp)\\.', clip_sigmas: 12.0}, {scheme: gptq8}]",
                         "quant.lqer={rank: 2, top_k: 2}", "package.compressor=brotli_shuffle")
    script = tmp_path / "records" / "train_gpt.py"
    script.parent.mkdir()
    nbytes = write_train_gpt(recipe, script)
    files, _ = unpack_train_gpt(script.read_text())
    assert {"pipeline/export/gptq.py", "pipeline/export/lqer.py", "pipeline/export/packagers.py"} <= set(files)
    assert "zstandard and brotli" in script.read_text()
    env = dict(os.environ, PYTHONPATH=str(filtered_site_packages(tmp_path / "site")), DATA_PATH=str(small_data),
               OUT_DIR=str(tmp_path / "out"), SEED="7", PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "-S", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"^calibration schemes=gptq6,gptq8 calibration_time_s=", proc.stdout, re.MULTILINE)
    blob = (tmp_path / "out" / "final_model.bin").read_bytes()
    assert re.search(rf"Serialized model \S+\+brotli_shuffle-11: {len(blob)} bytes", proc.stdout)
    _, doc = codec.decode_artifact(blob)
    schemes = sorted(m["scheme"] for m in doc["tensors"].values())
    assert schemes.count("gptq6+lqer2") + schemes.count("gptq8+lqer2") == 2 and "gptq6" in schemes
    final = re.search(r"^final val_bpb=(\d+\.\d+) bytes_total=(\d+)$", proc.stdout, re.MULTILINE)
    assert final and int(final.group(2)) == len(blob) + nbytes
