"""Issue 12, item 5: every bad setting is refused when the recipe loads, through the real CLI,
with one `error:` line that names the flag; documented values are accepted as written.

Each case here failed before the load-time checks: `pgolf check` accepted the value (and `run`
failed after training, or with a traceback), or refused a documented value blaming the file.

    .venv/bin/python -m pytest -q tests/test_load_time_checks.py
"""

from __future__ import annotations

import re

import pytest
from test_cli import assert_user_error, cli_inprocess


@pytest.mark.parametrize("assignment, fragment", [
    # refused by `evaluate` / TTT only after training and packaging
    ("eval.stride=0", "eval.stride: must be >= 1 (got 0)."),
    ("eval.stride=129", "eval.stride (129) must be at most eval.seq_len (128)"),
    ("eval.batch_seqs=0", "eval.batch_seqs: must be >= 1 (got 0)."),
    ("ttt.chunk_tokens=0", "ttt.chunk_tokens: must be >= 1 (got 0)."),
    # a ZeroDivisionError traceback after step 1
    ("train.log_every=0", "train.log_every: must be >= 1 (got 0)."),
    # `check` exited 0, `run` died in the model's init
    ("model.init=orthogonl", "model.init: 'orthogonl' is not one of 'default' or 'orthogonal'. Did you mean"),
])
def test_check_refuses_what_run_would_fail_on(tmp_path, assignment, fragment):
    proc = cli_inprocess("check", "tiny", "--set", assignment, cwd=tmp_path)
    assert_user_error(proc, f"error: --set {assignment}: ", fragment)
    assert "tiny.yaml" not in proc.stderr  # the flag is to blame, not the recipe file
    assert proc.stdout == ""  # refused before the model is built


@pytest.mark.parametrize("assignment, fragment", [
    # `check` printed memory_fits=true; `run` and `bench` refused them on this machine
    ("train.cpu_workers=2", "train.cpu_workers=2 cannot be used here: a step has 1 pass(es) to share"),
    ("train.attention_kernel=cudnn", "train.attention_kernel=cudnn is a CUDA kernel"),
])
def test_check_refuses_fast_paths_this_machine_cannot_run(tmp_path, assignment, fragment):
    if "CUDA kernel" in fragment:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a CUDA machine can run it")
    proc = cli_inprocess("check", "tiny", "--set", assignment, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {fragment}")
    assert proc.stdout == ""  # refused before the model is built


def test_run_refuses_before_any_work(tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(tmp_path / "no_data"), "--set", "train.log_every=0",
                         cwd=tmp_path)
    assert_user_error(proc, "error: --set train.log_every=0: train.log_every: must be >= 1 (got 0).")
    assert not (tmp_path / "artifacts").exists()


def test_documented_values_are_accepted_as_written(tmp_path):
    # YAML 1.1 read `on` as true and `1e6` as a string: both were refused, blaming recipes/tiny.yaml.
    proc = cli_inprocess("check", "tiny", "--set", "train.compile=on", "--set", "optim.matrix_lr=1e6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "params=723216" in proc.stdout.splitlines()


def test_a_bad_number_names_the_flag(tmp_path):
    proc = cli_inprocess("check", "tiny", "--set", "optim.matrix_lr=abc", cwd=tmp_path)
    assert_user_error(proc, "error: --set optim.matrix_lr=abc: optim.matrix_lr: ", "'abc'")
    assert "tiny.yaml" not in proc.stderr


def test_several_bad_flags_are_reported_together(tmp_path):
    proc = cli_inprocess("check", "tiny", "--set", "eval.stride=0", "--set", "ttt.chunk_tokens=0",
                         "--set", "train.log_every=0", cwd=tmp_path)
    assert_user_error(proc, "error: 3 problem(s):")
    lines = [line.strip() for line in proc.stderr.splitlines()[1:]]
    assert sorted(re.sub(r":.*", "", line) for line in lines) == [
        "--set eval.stride=0", "--set train.log_every=0", "--set ttt.chunk_tokens=0"]
    # a seed out of range is refused by the option's own type, before the recipe loads
    proc = cli_inprocess("check", "tiny", "--seed", "4294967296", cwd=tmp_path)
    assert_user_error(proc, "--seed", "4294967296", "0 to 4294967295")
