"""pgolf under faults and interruption: nothing corrupt is served, nothing non-finite becomes a result,
and a run interrupted anywhere resumes bitwise on its trajectory.

Each test failed on the code before this change: a flipped byte in a cached blob was scored and
reported; learning rates of 1e6 ended in `final val_bpb=nan` with exit 0; a Ctrl-C inside gradient
accumulation saved a mid-step checkpoint that left the trajectory.

    .venv/bin/python -m pytest -q tests/test_robustness.py
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import make_trainer, tiny_recipe
from pipeline.distributed import init
from pipeline.errors import NonFiniteLossError
from pipeline.stages.train import CHECKPOINT
from test_cli import cli_inprocess, run_dir_of, sets


# ------------------------------------------------------------------------------------ integrity


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cached_blob_is_rebuilt_not_served(small_data, tmp_path, damage):
    first = cli_inprocess("run", "tiny", "--data", str(small_data), *sets("train.max_steps=4"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    blob = run_dir_of(tmp_path / "artifacts") / "export" / "model.bin"
    data = bytearray(blob.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    blob.write_bytes(bytes(data))
    again = cli_inprocess("run", "tiny", "--data", str(small_data), *sets("train.max_steps=4"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage export runs again: model.bin does not match its manifest" in again.stdout
    assert "skip stage=train" in again.stdout
    # the rebuilt blob is the same bytes as the first, so the same score and size
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("loader", ["sequential", "coprime"])
def test_a_training_token_beyond_the_vocabulary_is_named_not_a_traceback(small_data, tmp_path, loader):
    """An id the model has no embedding row for (an IndexError on the CPU, a device-side assert on CUDA)
    is found by the loader as it reads it: a user error naming the shard and the tokens."""
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shard = sorted(data.glob("*_train_*.bin"))[0]
    tokens = np.fromfile(shard, dtype=np.uint16, offset=1024)  # after the 1024-byte header
    tokens[tokens != 1] = 60000  # every token but the BOS (1): the documents meta.json counts stay
    with open(shard, "r+b") as f:
        f.seek(1024)
        f.write(tokens.tobytes())
    proc = cli_inprocess("run", "tiny", "--data", str(data), *sets("train.max_steps=2", f"train.loader={loader}"),
                         cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{shard} (tokens " in proc.stderr and "holds token id 60000 >= model.vocab_size 320" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ numeric health


def test_weights_beyond_fp16_are_refused_at_export_naming_the_tensor(small_data, tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(small_data),
                         *sets("optim.matrix_lr=1000000", "optim.embed_lr=1000000"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "beyond fp16's range" in proc.stderr and "tensor '" in proc.stderr
    assert "final val_bpb" not in proc.stdout and not list(tmp_path.rglob("model.bin"))


def test_divergence_stops_at_its_step_and_keeps_only_a_finite_checkpoint(small_data, tmp_path):
    recipe = tiny_recipe("optim.matrix_lr=1e20", "optim.embed_lr=1e20", "optim.scalar_lr=1e20",
                         "train.checkpoint_every=1", "optim.muon_momentum_warmup_steps=0")
    trainer = make_trainer(recipe, small_data, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf|non-finite).* at step \d+; stopped") as e:
        trainer.run()
    ckpt = tmp_path / CHECKPOINT
    if "no checkpoint had been written yet" not in str(e.value):
        state = torch.load(ckpt, weights_only=False)
        tensors = list(state["model"].values()) + list(state["ema"]["shadow"].values())
        for opt in state["optimizers"]:
            for s in opt["state"].values():
                tensors += [t for t in s.values() if torch.is_tensor(t)]
        assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        assert f"(step {state['step']})" in str(e.value)


def test_a_non_finite_score_is_an_error_not_a_result(small_data, tmp_path, monkeypatch):
    import pipeline.stages.evaluate as ev

    real = ev.score

    def poisoned(model, data, recipe, dist_info, log, label):
        out = real(model, data, recipe, dist_info, log, label)
        return out | {"val_bpb": float("nan")} if label == "roundtrip" else out

    monkeypatch.setattr(ev, "score", poisoned)
    proc = cli_inprocess("run", "tiny", "--data", str(small_data), *sets("train.max_steps=2"), cwd=tmp_path)
    assert proc.returncode == 2 and "the roundtrip pass scored" in proc.stderr
    assert "final val_bpb" not in proc.stdout


# ------------------------------------------------------------------------------------ interruption


def _sigint_on_call(loader, n: int):
    """Make the loader's n-th next_batch call deliver SIGINT (inside a step's accumulation)."""
    real, calls = loader.next_batch, [0]

    def next_batch():
        calls[0] += 1
        if calls[0] == n:
            signal.raise_signal(signal.SIGINT)
        return real()

    loader.next_batch = next_batch


@pytest.mark.parametrize("loader", ["sequential", "coprime"])
def test_sigint_inside_gradient_accumulation_resumes_bitwise(small_data, tmp_path, loader, one_thread):
    # 4 micro-steps per step; the signal arrives in the 2nd micro-step of step 6
    recipe = tiny_recipe(f"train.loader={loader}", "train.reference_world_size=4", "train.coprime.queue_depth=2",
                         "train.checkpoint_every=4")
    full = make_trainer(recipe, small_data, tmp_path / "full")
    full.run()
    first = make_trainer(recipe, small_data, tmp_path / "resumed")
    _sigint_on_call(first.loader, 4 * 5 + 2)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["step"] == 6  # a step boundary
    second = make_trainer(recipe, small_data, tmp_path / "resumed")
    result = second.run()
    assert result.resumed_from == 6
    for (k, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert [h["loss"] for h in full.history] == [h["loss"] for h in second.history]


def test_a_second_sigint_stops_at_once_and_keeps_the_last_boundary_checkpoint(small_data, tmp_path):
    recipe = tiny_recipe("train.checkpoint_every=4")
    trainer = make_trainer(recipe, small_data, tmp_path)
    real, calls = trainer.loader.next_batch, [0]

    def next_batch():
        calls[0] += 1
        if calls[0] == 6:  # inside step 6: twice, as an impatient user does
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real()

    trainer.loader.next_batch = next_batch
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 4  # not the mid-step state
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigint_inside_ttt_reruns_the_score_stage_to_the_same_result(small_data, tmp_path, monkeypatch):
    import pipeline.stages.evaluate as ev
    from pipeline.run import run_recipe

    recipe = tiny_recipe("train.max_steps=4", "ttt.chunk_tokens=256")
    plain = run_recipe(recipe, small_data, tmp_path / "plain", init("cpu"), echo=lambda s: None)

    real = ev._progress_every

    def interrupting(log, label):
        inner = real(log, label)

        def progress(done, total):
            if label == "ttt" and done == 2:
                signal.raise_signal(signal.SIGINT)
            inner(done, total)

        return progress

    monkeypatch.setattr(ev, "_progress_every", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, small_data, tmp_path / "cut", init("cpu"), echo=lambda s: None)
    monkeypatch.setattr(ev, "_progress_every", real)
    lines: list[str] = []
    resumed = run_recipe(recipe, small_data, tmp_path / "cut", init("cpu"), echo=lines.append)
    assert any(line.startswith("skip stage=train") for line in lines)
    assert any(line.startswith("skip stage=export") for line in lines)
    assert resumed["val_bpb"] == plain["val_bpb"] and resumed["artifact_sha256"] == plain["artifact_sha256"]


# ------------------------------------------------------------------------------------ containment


@pytest.mark.parametrize("command", ["run", "submit", "check"])
@pytest.mark.parametrize("name", ["../../escaped", "x/../../../../victim", "/abs", ".hidden"])
def test_a_recipe_name_that_is_a_path_is_refused_before_anything_is_written(small_data, tmp_path, command, name):
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    recipe = work / "evil.yaml"
    recipe.write_text(f"extends: {(Path(__file__).parents[1] / 'recipes' / 'tiny.yaml').as_posix()}\n"
                      f"name: {json.dumps(name)}\n")
    args = [command, str(recipe)] + (["--data", str(small_data)] if command != "check" else [])
    proc = cli_inprocess(*args, *sets("data.max_val_tokens=0"), cwd=work)
    assert proc.returncode == 2 and "name" in proc.stderr, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert (victim / "keep.txt").read_text() == "mine" and sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.rglob("escaped")) and not list(tmp_path.rglob("*.log"))
    assert sorted(p.name for p in work.iterdir()) == ["evil.yaml"]
