"""`pgolf submit`: the records folder is the shipped train_gpt.py's own output, every figure in
submission.json comes from its logs, done seeds are not redone, and every gate refuses.

    .venv/bin/python -m pytest -q tests/test_records.py
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.fileio import file_sha256
from pipeline.records import SeedLog, compliance, gate_problems, hardware_of, parse_seed_log
from test_cli import cli_inprocess, sets

SEEDS = (1, 2, 3)
SUBMIT_SETS = ("train.max_steps=4", "data.max_val_tokens=0", "eval.batch_seqs=64")


@pytest.fixture(scope="module")
def submitted(small_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("submit")
    proc = cli_inprocess("submit", "tiny", "--seeds", ",".join(map(str, SEEDS)), "--data", str(small_data),
                         "--device", "cpu", *sets(*SUBMIT_SETS), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = list((cwd / "records" / "track_non_record_16mb").iterdir())
    return cwd, folder, proc


def test_folder_holds_exactly_the_challenge_files(submitted):
    _, folder, proc = submitted
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_tiny", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "submission.json", "train_gpt.py", "artifact_bytes.png", "bpb_by_stage.png", "train_loss.png"]
        + [f"train_seed{s}.log" for s in SEEDS])
    assert proc.stdout.strip().splitlines()[-1] == f"records folder: {folder}"
    for png in folder.glob("*.png"):
        assert png.stat().st_size > 10_000
    readme = (folder / "README.md").read_text()
    assert "Non-record submission" in readme and "train_gpt.py" in readme
    # the run command names this vocabulary's exports, and the README says what the script says it needs
    assert "DATA_PATH=./data/datasets/fineweb10B_sp320 TOKENIZER_PATH=./data/tokenizers/fineweb_320_bpe.model" in readme
    # and the command these logs were really written by: one CPU process on the prepared folder
    assert "    DATA_PATH=.../prepared TOKENIZER_PATH=.../tokenizer.model SEED=<seed> PGOLF_DEVICE=cpu python " \
           "train_gpt.py\n" in readme
    script = (folder / "train_gpt.py").read_text()
    needs = [" ".join(re.search(pattern, text, re.DOTALL).group(1).split())
             for pattern, text in ((r"Needs (.*?)\. pgolf", script), (r"it needs (.*?)\.\n", readme))]
    assert needs[0] == needs[1] == "torch, numpy, sentencepiece, zstandard and brotli"  # tiny's script: brotli
    assert not list(folder.parent.glob(".*partial*"))  # no half-built folder left behind


def test_every_figure_comes_from_the_scripts_logs(submitted):
    _, folder, _ = submitted
    sub = json.loads((folder / "submission.json").read_text())
    logs = {s: parse_seed_log(s, folder / f"train_seed{s}.log") for s in SEEDS}
    assert sub["seeds"] == list(SEEDS)
    for s, log in logs.items():
        text = (folder / f"train_seed{s}.log").read_text()
        assert text.startswith(f"pgolf train_gpt.py recipe=tiny seed={s} ")
        assert text.strip().splitlines()[-1] == f"final val_bpb={log.figures['val_bpb']:.8f} " \
                                                 f"bytes_total={log.figures['bytes_total']}"
        row = sub["seed_results"][str(s)]
        for key in ("val_bpb", "val_loss", "val_bpb_prequant", "val_bpb_roundtrip", "val_bpb_ttt", "bytes_model",
                    "steps", "train_time_s", "eval_time_s", "artifact_sha256", "clip_scale"):
            assert row[key] == log.figures[key], key
        assert row["artifact_bytes"] == log.figures["bytes_total"]
        # bytes_total is the shipped script plus the blob that run wrote
        assert log.figures["bytes_code"] == (folder / "train_gpt.py").stat().st_size
        assert log.figures["bytes_total"] == log.figures["bytes_model"] + log.figures["bytes_code"]
        assert log.figures["steps"] == 4 and log.figures["ttt_compliant"] is True
        assert len(log.losses) >= 2 and set(log.groups) >= {"embed", "attn", "mlp", "control"}
    bpbs = [logs[s].figures["val_bpb"] for s in SEEDS]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs), abs=1e-15)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), rel=1e-12)
    st = sub["statistics"]["val_bpb"]
    half = 4.302652729911275 * st["std"] / math.sqrt(3)  # t(0.975, df=2)
    assert st["ci95_low"] == pytest.approx(st["mean"] - half) and st["ci95_high"] == pytest.approx(st["mean"] + half)
    assert sub["bytes_total"] == max(logs[s].figures["bytes_total"] for s in SEEDS)
    assert sub["bytes_code"] == (folder / "train_gpt.py").stat().st_size
    assert sub["track"] == "non_record_16mb" and "CPU" in sub["hardware"]
    assert sub["compliance"] == {"track": "non_record", "train_under_600s": True, "eval_under_600s": True,
                                 "artifact_under_16mb": True, "score_first_ttt": True, "causal": True,
                                 "one_validation_set": True, "three_seeds": True}
    assert sub["validation"]["sha256"] == logs[1].figures["val_sha256"]
    assert sub["vocab_size"] == 320 and len(sub["tokenizer_sha256"]) == 64


def test_the_log_is_reproduced_by_running_the_shipped_script(submitted, small_data, tmp_path):
    """Run the folder's train_gpt.py for seed 2 by hand: the same figures as its log."""
    _, folder, _ = submitted
    env = dict(os.environ, DATA_PATH=str(small_data), SEED="2", OUT_DIR=str(tmp_path), PGOLF_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = tmp_path / "again.log"
    again.write_text(proc.stdout)
    mine, logged = parse_seed_log(2, again).figures, parse_seed_log(2, folder / "train_seed2.log").figures
    for key in ("val_bpb", "val_loss", "val_bpb_prequant", "artifact_sha256", "bytes_total", "val_sha256"):
        assert mine[key] == logged[key], key
    assert file_sha256(tmp_path / "final_model.bin") == logged["artifact_sha256"]


def test_done_seeds_are_not_redone_and_a_damaged_one_is(submitted, small_data):
    cwd, folder, _ = submitted
    (staging,) = list((cwd / "artifacts" / "tiny").glob("submit-*"))
    blob = staging / "seed2" / "final_model.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    first = json.loads((folder / "submission.json").read_text())
    baseline = cwd / "baseline.txt"  # a baseline 0.1 nats worse on every seed: a record by the rule
    baseline.write_text("".join(f"{v['val_loss'] + 0.1 + 0.001 * i}\n"
                                for i, v in enumerate(first["seed_results"].values())))
    proc = cli_inprocess("submit", "tiny", "--seeds", ",".join(map(str, SEEDS)), "--data", str(small_data),
                         "--device", "cpu", "--against", str(baseline), *sets(*SUBMIT_SETS), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed 1: already done" in proc.stdout and "seed 3: already done" in proc.stdout
    assert "seed 2: already done" not in proc.stdout and "pgolf train_gpt.py recipe=tiny seed=2" in proc.stdout
    # the first folder is untouched; the second gets a free name
    assert (folder / "train_seed1.log").exists()
    second = folder.parent / f"{folder.name}_2"
    comparison = json.loads((second / "submission.json").read_text())["comparison"]
    assert comparison["baseline"] == str(baseline)
    assert "verdict=record" in comparison["lines"] and "## Against the baseline" in (second / "README.md").read_text()
    # Other seeds, in another order, first: the script is the same (each run's seed comes from SEED),
    # so the seeds already done stay done (it used to carry the first seed and set every log aside).
    proc = cli_inprocess("submit", "tiny", "--seeds", "3,1", "--data", str(small_data), "--device", "cpu",
                         *sets(*SUBMIT_SETS), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "changed since" not in proc.stdout and "pgolf train_gpt.py" not in proc.stdout
    assert "seed 3: already done" in proc.stdout and "seed 1: already done" in proc.stdout


@pytest.mark.parametrize("seeds, baseline, reason", [
    ("1,2", "missing.txt", "no such file or folder"),
    ("1,2", "one_seed.txt", "the baseline"),
    ("1", "two_seeds.txt", "submit --against: this submit has 1 per-seed value"),
])
def test_submit_refuses_an_unusable_baseline_before_any_run(small_data, tmp_path, seeds, baseline, reason):
    (tmp_path / "one_seed.txt").write_text("1.9\n")
    (tmp_path / "two_seeds.txt").write_text("1.9\n1.91\n")
    proc = cli_inprocess("submit", "tiny", "--seeds", seeds, "--data", str(small_data), "--device", "cpu",
                         "--against", str(tmp_path / baseline), *sets(*SUBMIT_SETS), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert reason in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("train_seed*.log")) and not (tmp_path / "artifacts").exists()


# ------------------------------------------------------------------------------------ gates


def _log(seed, **over) -> SeedLog:
    figures = {"val_bpb": 1.1, "val_loss": 1.9, "bytes_total": 15_900_000, "cap_bytes": 16_000_000,
               "train_time_s": 590.0, "eval_time_s": 400.0, "ttt_compliant": True, "causal": True,
               "val_sha256": "ab" * 32, "val_token_count": 62_021_633, "world_size": 8, "device": "cuda:0",
               "device_name": "NVIDIA H100 80GB HBM3"}
    figures.update(over)
    return SeedLog(seed, Path(f"train_seed{seed}.log"), figures)


def test_every_gate_passes_a_compliant_8xh100_submission():
    logs = [_log(1), _log(2), _log(3)]
    assert hardware_of(logs) == ("record", "8x NVIDIA H100 80GB HBM3")
    assert gate_problems(logs, "record") == []
    assert all(v for k, v in compliance(logs, "record").items() if k != "track")


@pytest.mark.parametrize("over, reason", [
    ({"eval_time_s": 600.2}, "seed 2: evaluation took 600.2 s > 600 s"),
    ({"train_time_s": 600.01}, "seed 2: training took 600.0 s > 600 s"),
    ({"bytes_total": 16_000_001}, "seed 2: bytes_total 16,000,001 > 16,000,000"),
    ({"ttt_compliant": False}, "seed 2: TTT was not score-first"),
    ({"causal": False}, "seed 2: the model is not causal"),
    ({"val_sha256": "cd" * 32}, "the seeds scored different validation sets"),
])
def test_each_gate_refuses(over, reason):
    logs = [_log(1), _log(2, **over), _log(3)]
    problems = gate_problems(logs, "record")
    assert len(problems) == 1 and reason in problems[0], problems


def test_other_hardware_goes_to_the_non_record_track_with_times_reported_not_enforced():
    logs = [_log(1, world_size=1, device_name="NVIDIA H200"), _log(2, world_size=1, device_name="NVIDIA H200",
                                                                   train_time_s=4000.0)]
    track, hardware = hardware_of(logs)
    assert (track, hardware) == ("non_record", "1x NVIDIA H200")
    assert gate_problems(logs, track) == []
    assert compliance(logs, track)["train_under_600s"] is False  # computed, and shown in the folder


def test_submit_refuses_a_failing_audit_before_any_run(small_data, tmp_path):
    # ELiTA's published length-normalised positions are legal by every setting but fail the audit
    proc = cli_inprocess("submit", "elita", "--seeds", "1", "--data", str(small_data),
                         *sets("data.max_val_tokens=0", "model.elita.length_normalised_positions=true"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fails `pgolf audit`" in proc.stderr and "prefix_consistency" in proc.stderr
    assert not (tmp_path / "records").exists() and not list(tmp_path.rglob("train_seed1.log"))


def test_parse_seed_log_refuses_an_incomplete_log(tmp_path):
    log = tmp_path / "train_seed1.log"
    log.write_text("pgolf train_gpt.py recipe=tiny seed=1\nstep=1/4 loss=6.0\n")
    with pytest.raises(UserError, match="not a complete train_gpt.py log"):
        parse_seed_log(1, log)


def test_the_script_alone_in_the_challenge_layout_matches_pgolf_run(small_data, tmp_path):
    """train_gpt.py copied alone into an empty folder laid out as the challenge's, run with no
    environment at all: the same val_bpb (to 1e-6) and the same blob bytes as `pgolf run`."""
    import shutil

    from conftest import tiny_recipe
    from pipeline.codegen import write_train_gpt

    extra = ("train.max_steps=4", "data.max_val_tokens=0")
    recipe = tiny_recipe(*extra)
    root = tmp_path / "records_folder"
    datasets = root / "data" / "datasets" / f"fineweb10B_sp{recipe.model.vocab_size}"
    datasets.mkdir(parents=True)
    (root / "data" / "tokenizers").mkdir()
    for split in ("train", "val"):
        for i, shard in enumerate(sorted(small_data.glob(f"*_{split}_*.bin"))):
            shutil.copyfile(shard, datasets / f"fineweb_{split}_{i:06d}.bin")
    shutil.copyfile(small_data / "tokenizer.model",
                    root / "data" / "tokenizers" / f"fineweb_{recipe.model.vocab_size}_bpe.model")
    write_train_gpt(recipe, root / "train_gpt.py")
    assert sorted(p.name for p in root.iterdir()) == ["data", "train_gpt.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "SEED", "OUT_DIR")}
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (root / "script.log").write_text(proc.stdout)
    script = parse_seed_log(recipe.seed, root / "script.log").figures

    pgolf_data = tmp_path / "pgolf_data"  # the same files, with the tokenizer where pgolf keeps it
    shutil.copytree(datasets, pgolf_data)
    shutil.copyfile(root / "data" / "tokenizers" / f"fineweb_{recipe.model.vocab_size}_bpe.model",
                    pgolf_data / "tokenizer.model")
    run = cli_inprocess("run", "tiny", "--data", str(pgolf_data), *sets(*extra), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    (report,) = list((tmp_path / "artifacts").rglob("report.json"))
    mine = json.loads(report.read_text())
    assert abs(script["val_bpb"] - mine["val_bpb"]) < 1e-6
    assert script["artifact_sha256"] == mine["artifact_sha256"]
    assert file_sha256(root / "final_model.bin") == file_sha256(report.parent / "export" / "model.bin")
    assert script["bytes_total"] == mine["bytes_total"]


def test_submit_refuses_data_whose_validation_documents_occur_in_training(tmp_path):
    """The fault that invalidated a lineage of records: a validation document also in training."""
    import random as rnd

    from pipeline.data.prepare import prepare_jsonl

    rng = rnd.Random(3)
    words = "the king and queen of this realm shall speak to thee now my lord good night sir".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 60))) for _ in range(120)]
    docs.append(docs[0])  # the first (validation) document again, in training
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_jsonl(src, tmp_path / "leaky", vocab_size=320, val_docs=10)
    proc = cli_inprocess("submit", "tiny", "--seeds", "1", "--data", str(tmp_path / "leaky"),
                         *sets("data.max_val_tokens=0"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "overlap_docs=1 " in proc.stdout and "submit refuses" in proc.stderr
    assert not list(tmp_path.rglob("train_seed1.log"))
