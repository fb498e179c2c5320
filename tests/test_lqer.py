"""Issue 13 item 3: LQER low-rank error repair (pipeline/export/lqer.py).

The repair must shrink the error of the tensors it picks (the top_k by ||W - W_hat||_F), its
factors must be in the container (so its bytes are counted) in the record's asymmetric packing,
the reader must rebuild the scheme from its name alone, and the size predictor must count it.

    .venv/bin/python -m pytest -q tests/test_lqer.py
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import LqerConfig, PackageConfig, QuantConfig, QuantRule
from pipeline.export import codec, lqer
from pipeline.export.artifact import load_artifact, package_model, serialize
from pipeline.export.plan import quantize_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank_plus_noise(rows: int, cols: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * (torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
                    + 0.3 * torch.randn(rows, cols, generator=g))


def test_factors_use_the_records_asymmetric_packing():
    g = torch.Generator().manual_seed(0)
    err = torch.randn(10, 24, generator=g)
    e = lqer.factor_entries("w", err, 4)
    qA, sA, qB, sB = e["w.lqA"], e["w.lqAs"], e["w.lqB"], e["w.lqBs"]
    assert qA.shape == (10, 4) and qB.shape == (4, 24) and sA.shape == () and sB.shape == (2,)  # 96 = 64 + 32
    assert qA.dtype == qB.dtype == torch.int8 and sA.dtype == sB.dtype == torch.float16
    assert int(qA.min()) >= -2 and int(qA.max()) <= 1 and int(qB.min()) >= -8 and int(qB.max()) <= 7
    U, S, Vh = torch.linalg.svd(err.double(), full_matrices=False)
    A, B = (U[:, :4] * S[:4]).float(), Vh[:4].float()
    assert sA == (A.abs().amax() / 1.5).to(torch.float16)
    flat = B.reshape(-1)
    assert torch.equal(sB, torch.stack([flat[:64].abs().amax(), flat[64:].abs().amax()]).div(7.5).to(torch.float16))
    # the correction is (qA sA)(qB sB), and it points along the error
    c = lqer.correction(e, "w")
    assert c.shape == err.shape and float((err - c).norm()) < float(err.norm())


def test_lqer_reduces_the_error_of_its_top_k_and_leaves_the_rest_alone():
    # three matrices whose int6 errors are ordered by their scale; top_k=2 repairs the two largest
    state = {"big.weight": _low_rank_plus_noise(40, 64, 1, 1.0), "mid.weight": _low_rank_plus_noise(40, 64, 2, 0.3),
             "small.weight": _low_rank_plus_noise(40, 64, 3, 0.01), "bias": torch.randn(64)}
    rules = (QuantRule(scheme="int6", min_numel=100), QuantRule(scheme="fp16"))
    plain = quantize_state_dict(state, QuantConfig(rules=rules))
    fixed = quantize_state_dict(state, QuantConfig(rules=rules, lqer=LqerConfig(rank=4, top_k=2)))
    assert {n: m["scheme"] for n, m in fixed.manifest.items()} == {
        "big.weight": "int6+lqer4", "mid.weight": "int6+lqer4", "small.weight": "int6", "bias": "fp16"}
    assert [e.get("lqer_rank") for e in fixed.plan] == [4, 4, None, None]
    for name in ("big.weight", "mid.weight"):
        before = codec.dequantize_tensor({k: plain.tensors[k] for k in plain.entries_of(name)}, name, "int6",
                                         torch.float32, [40, 64])
        after = codec.dequantize_tensor({k: fixed.tensors[k] for k in fixed.entries_of(name)}, name, "int6+lqer4",
                                        torch.float32, [40, 64])
        assert float((state[name] - after).norm()) < 0.9 * float((state[name] - before).norm()), name
        # the base codes are untouched: LQER only adds entries
        assert torch.equal(fixed.tensors[name + ".q"], plain.tensors[name + ".q"])
    for k in plain.entries_of("small.weight"):
        assert torch.equal(fixed.tensors[k], plain.tensors[k])
    # its bytes are in the container: exactly the four factors of each repaired tensor more
    extra = sum(v.numel() * v.element_size() for k, v in fixed.tensors.items() if ".lq" in k)
    assert extra == 2 * (40 * 4 + 2 + 4 * 64 + 2 * math.ceil(4 * 64 / 64))
    assert len(serialize(fixed, {})) >= len(serialize(plain, {})) + extra


def test_a_repaired_blob_reads_back_by_scheme_name_alone(tmp_path, monkeypatch):
    state = {"m.weight": _low_rank_plus_noise(24, 40, 4, 0.5), "n.weight": _low_rank_plus_noise(16, 40, 5, 0.5)}
    rules = (QuantRule(scheme="gptq6"),)
    h = torch.eye(40) + 0.5
    calibration = {"gptq6": {"m.weight": h, "n.weight": h}}
    q = quantize_state_dict(state, QuantConfig(rules=rules, lqer=LqerConfig(rank=3, top_k=1)), calibration=calibration)
    (chosen,) = [n for n, m in q.manifest.items() if m["scheme"] == "gptq6+lqer3"]
    out = package_model(q, tmp_path / "model.bin", PackageConfig(), code_bytes=0, meta={})
    # a reader that never saw the derived scheme rebuilds it from its name (codec.RESOLVERS)
    monkeypatch.delitem(codec.SCHEMES, "gptq6+lqer3")
    sd, _ = load_artifact(tmp_path / "model.bin", out["sha256"])
    entries = {k: q.tensors[k] for k in q.entries_of(chosen)}
    base = codec.int_decode(entries, chosen, torch.float32, list(state[chosen].shape))
    assert torch.equal(sd[chosen], base + lqer.correction(entries, chosen))
    # the layout the predictor uses is the one written
    layout = codec.get_scheme("gptq6+lqer3").layout(chosen, tuple(state[chosen].shape), torch.float32)
    assert [(e.key, e.dtype, e.shape) for e in layout] == [(k, entries[k].dtype, list(entries[k].shape))
                                                           for k in q.entries_of(chosen)]


def test_every_shape_roundtrips_and_matches_its_layout():
    for base in ("int6", "int8", "gptq6"):
        name = lqer.derived_name(base, 4)
        spec = codec.get_scheme(name)
        assert spec is not None and not spec.selectable and spec.int_range == codec.get_scheme(base).int_range
        for shape in ((6, 10), (3, 2, 4), (2, 3), (9,), ()):
            t = torch.randn(shape) * 0.1
            e = codec.quantize_tensor(t, name, name="w", calibration=spec.stand_in(shape) if spec.stand_in else None)
            layout = spec.layout("w", shape, torch.float32)
            assert [(x.key, x.dtype, x.shape) for x in layout] == [(k, v.dtype, list(v.shape)) for k, v in e.items()]
            back = codec.dequantize_tensor(e, "w", name, torch.float32, list(shape))
            assert back.shape == t.shape and bool(torch.isfinite(back).all())
    assert codec.get_scheme("fp16+lqer4") is None and codec.get_scheme("int6+lqer0") is None


def test_the_size_predictor_counts_lqer_bytes():
    from pipeline.export.predict import predict_bytes

    shapes = {f"blocks.{i}.mlp.fc.weight": ((256, 64), torch.float32) for i in range(3)}
    shapes["tok_emb.weight"] = ((512, 64), torch.float32)
    rules = (QuantRule(scheme="int6"),)
    plain = predict_bytes(shapes, QuantConfig(rules=rules), PackageConfig())
    fixed = predict_bytes(shapes, QuantConfig(rules=rules, lqer=LqerConfig(rank=4, top_k=2)), PackageConfig())
    # the two largest (tok_emb and one fc) carry (rows + cols) x 4 codes and their scales more
    raw_extra = (512 + 64) * 4 + (256 + 64) * 4
    assert 0.1 * raw_extra < fixed["total"] - plain["total"] < 1.2 * raw_extra + 200
