"""End to end through the `pgolf` CLI: a full run writes an honest report and resumes by
manifest; every bad input gives one readable line, exit code 2 and no traceback.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SETS

FINAL = re.compile(r"^final val_bpb=(\d+\.\d{8}) bytes_total=(\d+)$")


def pgolf(*args, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PGOLF_CACHE=str(cwd / "cache"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def sets(*extra):
    out = []
    for s in (*TINY_SETS, *extra):
        out += ["--set", s]
    return out


def cli_inprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run `pgolf ARGS` through the real entry point in this process (no interpreter start-up)."""
    import contextlib
    import io

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["pgolf", *args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # the message is everything from the "error: " line on (after any progress bar)
    text = proc.stderr.replace("\r", "\n")
    assert "\nerror: " in "\n" + text, text
    message = text[("\n" + text).index("\nerror: "):]
    assert message.count("error: ") == 1, message
    for f in fragments:
        assert f in message, message


def run_dir_of(out_root: Path, recipe: str = "tiny", seed: int = 1337) -> Path:
    """The one run folder `<out>/<recipe>/<data tag>/seed<seed>` under `out_root`."""
    (found,) = list((Path(out_root) / recipe).glob(f"*/seed{seed}"))
    return found


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    proc = pgolf("run", "tiny", "--data", str(small_data), *sets(), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc


def test_run_writes_report_and_final_line(finished_run):
    cwd, proc = finished_run
    last = proc.stdout.strip().splitlines()[-1]
    m = FINAL.match(last)
    assert m, last
    run_dir = run_dir_of(cwd / "artifacts")
    assert run_dir.parent.name.startswith("prepared-")  # the data tag: dir name + content hash
    assert f"run_dir={run_dir}" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    required = ("val_bpb val_loss val_bpb_prequant val_bpb_roundtrip val_bpb_ttt ttt_compliant params bytes_model "
                "bytes_code bytes_total steps train_time_s eval_time_s tokens_seen val_tokens val_bytes device "
                "world_size recipe seed").split()
    assert not [k for k in required if k not in report]
    assert float(m.group(1)) == pytest.approx(report["val_bpb"], abs=1e-8)
    assert int(m.group(2)) == report["bytes_total"] == report["bytes_model"] + report["bytes_code"]
    assert report["val_bpb"] == report["val_bpb_ttt"]  # TTT on: the reported score is the TTT one
    assert report["ttt_compliant"] is True and report["causal"] is True
    assert report["steps"] == 12 and report["tokens_seen"] == 12 * 256
    # bytes on disk are what the report says
    assert (run_dir / "export" / "model.bin").stat().st_size == report["bytes_model"]
    # val_bpb is nats / (bytes ln 2) of the scored targets
    nats = report["val_loss"] * report["val_tokens"]
    assert report["val_bpb"] == pytest.approx(nats / (report["val_bytes"] * np.log(2)))
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "step=4/12 loss=" in (run_dir / "train.log").read_text()
    for stage in ("train", "export", "score"):
        assert (run_dir / stage / "manifest.json").exists()
    plan = json.loads((run_dir / "export" / "manifest.json").read_text())["outputs"]["plan"]
    assert {row["scheme"] for row in plan} >= {"fp32", "fp16"}


def test_rerun_skips_matching_stages_and_reports_the_same(finished_run, small_data):
    cwd, first = finished_run
    again = pgolf("run", "tiny", "--data", str(small_data), *sets(), cwd=cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skip stage=train" in again.stdout and "skip stage=score" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]


def test_check_baseline_params(tmp_path):
    proc = cli_inprocess("check", "baseline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "params=17059912" in proc.stdout.splitlines()
    total = int(re.search(r"^predicted_bytes_total=(\d+)$", proc.stdout, re.M).group(1))
    assert 8_000_000 < total < 16_000_000
    # the baseline sets no scale floor: its size does not move with the RMS, and check says so instead of a curve
    assert "no quant rule sets a scale_floor" in proc.stdout and "cap_rms" not in proc.stdout


def test_check_over_the_cap_at_every_rms_says_so(tmp_path):
    # it printed cap_rms=0.020 ("a larger RMS would not fit"), as if 0.02 fitted
    floors = ("quant.rules=[{scheme: fp32, roles: [control, gate]}, {scheme: fp16, max_numel: 65536}, "
              "{scheme: int6, scale_floor: 0.03225806451612903}]")
    proc = cli_inprocess("check", "tiny", "--set", floors, "--set", "package.cap_bytes=100000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^cap_rms=none \(over the cap already at RMS 0.02, the smallest tried\)$", proc.stdout, re.M)


def test_check_sidecar48_reports_the_rms_that_fits(tmp_path):
    proc = cli_inprocess("check", "sidecar48", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "params=26823765" in proc.stdout.splitlines()
    curve = [int(n) for n in re.findall(r"^predicted_bytes_total_at_rms_[\d.]+=(\d+)$", proc.stdout, re.M)]
    assert len(curve) == 5 and curve == sorted(curve) and curve[0] < 16_000_000 < curve[-1]
    cap_rms = float(re.search(r"^cap_rms=([\d.]+) ", proc.stdout, re.M).group(1))
    assert 0.1 < cap_rms < 0.3  # between the grid points that bracket the cap


def test_malformed_recipe_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrain: {max_steps: [}\n")
    assert_user_error(cli_inprocess("check", str(bad), cwd=tmp_path), "malformed YAML", "bad.yaml:2")


def test_unknown_key(tmp_path):
    assert_user_error(cli_inprocess("check", "tiny", "--set", "model.num_layer=2", cwd=tmp_path),
                      "model.num_layer: unknown key. Did you mean 'model.num_layers'?")


def test_wrong_type(tmp_path):
    assert_user_error(cli_inprocess("check", "tiny", "--set", "train.max_steps=lots", cwd=tmp_path), "train.max_steps")


def test_missing_data_dir(tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(tmp_path / "nope"), cwd=tmp_path)
    assert_user_error(proc, "nope", "does not exist")


@pytest.mark.parametrize("command", [("check", "tiny"), ("run", "tiny")])
def test_a_cache_variable_naming_a_file_is_refused_by_name(tmp_path, monkeypatch, command):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("PGOLF_CACHE", str(tmp_path / "afile"))
    proc = cli_inprocess(*command, *sets("train.max_steps=1"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"PGOLF_CACHE={tmp_path / 'afile'} is an existing file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli_inprocess("run", "tiny", "--data", str(tmp_path / "empty"), cwd=tmp_path),
                      "empty", "pgolf data prepare")


def _copy_data(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_shard_header(small_data, tmp_path):
    d = _copy_data(small_data, tmp_path / "d")
    shard = sorted(d.glob("*_val_*.bin"))[0]
    buf = bytearray(shard.read_bytes())
    buf[0:4] = (12345).to_bytes(4, "little")
    shard.write_bytes(bytes(buf))
    assert_user_error(cli_inprocess("run", "tiny", "--data", str(d), *sets(), cwd=tmp_path), shard.name, "20240520")


def test_truncated_shard_payload(small_data, tmp_path):
    d = _copy_data(small_data, tmp_path / "d")
    shard = sorted(d.glob("*_train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    assert_user_error(cli_inprocess("run", "tiny", "--data", str(d), *sets(), cwd=tmp_path), shard.name)


def test_tokenizer_vocab_disagrees_with_recipe(small_data, tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(small_data), cwd=tmp_path)  # recipe says 1024, data 320
    assert_user_error(proc, "1024", "320")


def test_artifact_over_cap_is_an_error_and_leaves_no_blob(small_data, tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(small_data), *sets("package.cap_bytes=50000"), cwd=tmp_path)
    assert_user_error(proc, "over the cap")
    assert not list((tmp_path / "artifacts").rglob("model.bin"))


def test_prepare_requires_exactly_one_source(tmp_path):
    assert_user_error(cli_inprocess("data", "prepare", "--out", str(tmp_path / "o"), cwd=tmp_path), "--text", "--jsonl")


def test_prepare_rejects_non_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert_user_error(cli_inprocess("data", "prepare", "--text", str(f), "--out", str(tmp_path / "o"), cwd=tmp_path),
                      "latin1.txt")
    assert not (tmp_path / "o").exists()


def test_audit_passes_causal_depth_recurrent_and_names_the_leak(tmp_path):
    ok = cli_inprocess("audit", "depth_recurrent", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "future_perturbation@16 PASS" in ok.stdout and "batch_independence PASS" in ok.stdout
    assert ok.stdout.strip().endswith("audit depth_recurrent: PASS")
    leak = cli_inprocess("audit", "depth_recurrent", "--set", "model.leaky_selective_state=true", cwd=tmp_path)
    assert leak.returncode == 1
    assert re.search(r"future_perturbation@16 FAIL max_dev=\S+ culprit=selective_state position=\d+", leak.stdout)
    assert "batch_independence PASS" in leak.stdout
    assert "selective_state" in leak.stderr and "future_perturbation" in leak.stderr


def test_submit_refuses_a_capped_validation_set_before_training(small_data, tmp_path):
    proc = cli_inprocess("submit", "tiny", "--seeds", "1", "--data", str(small_data), *sets(), cwd=tmp_path)
    assert_user_error(proc, "data.max_val_tokens")
    assert not (tmp_path / "artifacts").exists()


def test_lossy_challenge_tokenizer_counts_normalized_bytes_and_warns(tmp_path):
    """With the challenge's sp1024 (NFKC, newlines folded) bpb counts the normalized bytes, as
    the challenge does; the report shows them beside the raw count and warns."""
    from conftest import SHARED, small_text

    model = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    if not model.exists():
        pytest.skip("shared tokenizer models not present")
    text = tmp_path / "t.txt"
    text.write_text(small_text())
    prep = cli_inprocess("data", "prepare", "--text", str(text), "--out", str(tmp_path / "d"), "--tokenizer",
                         str(model), cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    assert "lossless=False" in prep.stdout
    proc = cli_inprocess("run", "tiny", "--data", str(tmp_path / "d"),
                         *sets("data.max_val_tokens=0", "model.vocab_size=1024"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run_dir_of(tmp_path / "artifacts") / "report.json").read_text())
    assert report["val_stream_bytes"] < report["val_raw_bytes"]
    assert "raw bytes (it normalizes text)" in report["val_bytes_warning"]
    assert "warning: the tokenizer accounts" in proc.stdout
