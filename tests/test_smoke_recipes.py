"""CPU smoke runs of the published recipes at tiny size: every part of sidecar48 and
depth_recurrent end to end (train, EMA, quantize, package, roundtrip, TTT, sliding bpb), and
the legality flags: the leak and the train-then-score TTT mark every line and the report, and
`submit` refuses both.

    .venv/bin/python -m pytest -q tests/test_smoke_recipes.py
"""

from __future__ import annotations

import json

import pytest

from conftest import SMALL_VOCAB
from pipeline.export.packagers import lrzip_available
from pipeline.distributed import init
from pipeline.errors import UserError
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from pipeline.stages.report import NONCAUSAL, NONCOMPLIANT, final_line

COMMON = (f"model.vocab_size={SMALL_VOCAB}", "train.seq_len=32", "train.batch_tokens=256",
          "train.reference_world_size=1", "train.max_steps=6", "train.max_wallclock_s=0", "train.warmdown_by=steps",
          "train.warmdown_steps=2", "train.prime_steps=0", "train.log_every=2", "train.checkpoint_every=3",
          "eval.seq_len=32", "eval.stride=16", "eval.batch_seqs=32", "data.max_val_tokens=1024")
SIDECAR48 = COMMON + ("model.num_layers=5", "model.model_dim=32", "model.num_heads=4", "model.num_kv_heads=2",
                      "model.rope.dims=8", "model.rope.ntk_train_seq_len=16", "model.bigram.buckets=64",
                      "model.bigram.dim=8", "model.sidecar.hidden=8", "model.sidecar.layers=[2,3,4]",
                      "train.coprime.mix_warmup_batches=4", "train.coprime.queue_depth=2", "ttt.chunk_tokens=256",
                      "ttt.epochs=1")
DEPTH_RECURRENT = COMMON + ("model.model_dim=32", "model.num_heads=4", "model.num_kv_heads=2",
                            "model.recurrent.k_rank=8", "model.recurrent.td_rank=4", "model.recurrent.gru_rank=4")
# 3 layers: the plain order 0 | 1 2 and, from step 3 on, 0 1 | 1 1 2 (layer 1 looped x3); layer 2 two-lane.
# GPTQ on 4 calibration batches; phased LoRA TTT at rank 4 in 8-token chunks, phases after 2 / 4 / 6 of the
# validation documents (`docs_data`).
FRONTIER = COMMON + ("model.num_layers=3", "model.model_dim=32", "model.num_heads=4", "model.num_kv_heads=2",
                     "model.rope.dims=4", "model.loop.start=1", "model.loop.end=1", "model.loop.enable_at=0.5",
                     "model.parallel.start_layer=2", "quant.calibration_batches=4", "ttt.lora_rank=4",
                     "ttt.lora_chunk_tokens=8", "ttt.lora_batch_docs=4", "ttt.phase_prefix_docs=6",
                     "ttt.chunk_tokens=256")


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory):
    """`small_text` as documents of 6 lines, BOS before each (phased TTT needs documents; a text export's
    validation split is one)."""
    from conftest import small_text
    from pipeline.data.prepare import prepare_jsonl

    root = tmp_path_factory.mktemp("docs_data")
    lines = small_text().splitlines()
    docs = ["\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_jsonl(root / "docs.jsonl", root / "prepared", vocab_size=SMALL_VOCAB, val_docs=40)
    return root / "prepared"


def _run(name, sets, small_data, tmp_path):
    lines: list[str] = []
    recipe = load_recipe(name, list(sets))
    report = run_recipe(recipe, small_data, tmp_path, init("cpu"), echo=lines.append)
    return recipe, report, lines


def test_sidecar48_every_part_end_to_end(small_data, tmp_path):
    recipe, report, lines = _run("sidecar48", SIDECAR48, small_data, tmp_path)
    assert recipe.train.loader == "coprime" and recipe.model.sidecar and recipe.model.bigram
    assert report["steps"] == 6 and report["ttt_compliant"] is True
    assert report["val_bpb"] == report["val_bpb_ttt"] and 0 < report["val_bpb"] < 20
    (manifest,) = list((tmp_path / "sidecar48").glob("*/seed1337/export/manifest.json"))
    plan = json.loads(manifest.read_text())["outputs"]["plan"]  # the resolved per-tensor plan
    by_name = {row["name"]: row for row in plan}
    assert by_name["blocks.0.attn.c_q.weight"]["scheme"] == "fp16"  # <= 65,536 elements at this width
    assert by_name["blocks.0.attn.k_shift"]["scheme"] == "fp32"
    assert any(line.startswith("ttt_exact mode=score_first") for line in lines)
    assert NONCOMPLIANT not in "\n".join(lines)


def test_sidecar48_full_size_export_plan_matches_pr684():
    import torch

    from pipeline.model import build_model
    from pipeline.export.plan import named_shapes_of, resolve_plan

    recipe = load_recipe("sidecar48")
    with torch.device("meta"):
        model = build_model(recipe.model)
    plan = {row["name"]: row for row in resolve_plan(named_shapes_of(model), recipe.quant.rules)}
    expect = {"blocks.0.attn.c_q.weight": "int6", "blocks.10.mlp.proj.weight": "int6", "tok_emb.weight": "int8",
              "bigram.embed.weight": "int8", "bigram.proj.weight": "fp16", "sidecar.w_gate.weight": "fp16",
              "sidecar.site_gate": "fp16", "sidecar.site_scales": "fp32", "sidecar.conv.weight": "fp16",
              "skip_weights": "fp32", "smear.gate": "fp32", "bigram.scale": "fp32", "blocks.3.attn.local_v_mix": "fp32"}
    assert {k: plan[k]["scheme"] for k in expect} == expect
    assert plan["blocks.0.attn.c_q.weight"]["scale_floor"] == pytest.approx(1 / 31)
    assert plan["tok_emb.weight"]["clip_percentile"] == 99.99984


def test_sidecar48_published_ttt_is_marked_non_compliant_everywhere(small_data, tmp_path):
    sets = SIDECAR48 + ("ttt.mode=pre_score_full_val", "ttt.epochs=2")
    with pytest.warns(RuntimeWarning, match="NOT compliant"):
        recipe, report, lines = _run("sidecar48", sets, small_data, tmp_path)
    assert report["ttt_compliant"] is False
    assert lines and all(line.endswith(NONCOMPLIANT) for line in lines)
    assert NONCOMPLIANT in final_line(report)
    with pytest.raises(UserError, match="trains on validation tokens before scoring"):
        from pipeline.records import submit

        submit("sidecar48", [1], list(sets), small_data, tmp_path, tmp_path / "records", device="cpu")


def test_depth_recurrent_causal_and_leaky(small_data, tmp_path):
    _, causal, lines = _run("depth_recurrent", DEPTH_RECURRENT, small_data, tmp_path / "causal")
    assert causal["causal"] is True and NONCAUSAL not in "\n".join(lines)
    assert set(causal["bytes_model_compare"]) == {"pr298_int8_zlib"}
    assert any(line.startswith("Compare plan pr298_int8_zlib:") for line in lines)
    _, leaky, lines = _run("depth_recurrent", DEPTH_RECURRENT + ("model.leaky_selective_state=true",),
                           small_data, tmp_path / "leaky")
    assert leaky["causal"] is False
    assert all(line.endswith(NONCAUSAL) for line in lines)
    assert NONCAUSAL in final_line(leaky)


def test_depth_recurrent_pr298_eval_mode_and_int8_zlib_export(small_data, tmp_path):
    sets = DEPTH_RECURRENT + ("eval.mode=pr298_all_positions",)
    _, report, lines = _run("depth_recurrent_int8_zlib", sets, small_data, tmp_path)
    assert report["eval_mode"] == "pr298_all_positions"
    assert report["val_tokens"] > 1024  # every position of every overlapping window counts
    assert set(report["bytes_model_compare"]) == {"int6_zstd22"}
    assert any("Serialized model" in line and "zlib" in line for line in lines)


@pytest.mark.usefixtures("one_thread")  # tiny tensors: 2 intra-op threads took 99 s here, one 19 s
def test_frontier_every_part_end_to_end(docs_data, tmp_path):
    # Looped layers, two-lane parallel decoder, gated skips, the BOS-masked SmearGate, XSA, the sparse
    # attention gate, LeakyReLU^2, Polar Express MuonEq-R Muon, the embedding decay, the LR floor,
    # EMA 0.9965, GPTQ int6/int7 with SD-clip, int8 attention gates, LQER, the per-group packer
    # (lrzip where installed), phased LoRA TTT.
    # Without the lrzip program (a machine without the Debian package) the recipe's per-group packer
    # cannot run; every other part still does, packed with the byte-shuffled brotli it compares against.
    lrzip = lrzip_available()
    sets = FRONTIER if lrzip else FRONTIER + ("package.compressor=brotli_shuffle", "package.compare_compressors=[]")
    recipe, report, lines = _run("frontier", sets, docs_data, tmp_path)
    m, o = recipe.model, recipe.optim
    assert (m.trunk, m.attention, m.mlp, m.parallel.mode, m.input_smear.mask_bos) == \
        ("looped_gpt", "xsa", "leaky_relu2", "two_lane", True)
    assert (o.muon_ns_coeffs, o.muon_row_normalize, o.embed_wd, recipe.ema.decay) == ("polar_express", True, 0.085,
                                                                                      0.9965)
    assert report["steps"] == 6 and report["ttt_compliant"] is True and report["causal"] is True
    assert report["val_bpb"] == report["val_bpb_ttt"] and 0 < report["val_bpb"] < 20
    (manifest,) = list((tmp_path / "frontier").glob("*/seed1337/export/manifest.json"))
    plan = {row["name"]: row for row in json.loads(manifest.read_text())["outputs"]["plan"]}
    scheme = {k: row["scheme"] for k, row in plan.items()}
    assert {scheme[k] for k in ("lane_post", "skip_gates", "smear.gate.weight")} == {"fp16"}
    assert scheme["blocks.2.attn.attn_gate"] == "int8"
    assert (scheme["blocks.0.attn.c_q.weight"], plan["blocks.0.attn.c_q.weight"]["clip_sigmas"]) == ("gptq6", 13.0)
    assert (scheme["blocks.1.mlp.fc.weight"], plan["blocks.1.mlp.fc.weight"]["clip_sigmas"]) == ("gptq6", 11.5)
    assert (scheme["tok_emb.weight"], plan["tok_emb.weight"]["clip_sigmas"]) == ("gptq7", 14.0)
    assert sum(1 for row in plan.values() if row.get("lqer_rank")) == 3  # LQER's top 3
    (blob,) = list((tmp_path / "frontier").glob("*/seed1337/export/model.bin"))
    # pergroup frames its streams with b"PGRP"; brotli_shuffle is a bare brotli stream
    assert (blob.read_bytes()[:4] == b"PGRP") == lrzip
    assert any(line.startswith("calibration schemes=gptq6,gptq7") for line in lines)
    assert sum(line.startswith("ttt_phase ") for line in lines) == 3
    assert any(line.startswith("ttt_exact mode=phased_lora") for line in lines)
