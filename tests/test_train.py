"""Training: resume after an interruption continues the same trajectory bitwise; a NaN loss
stops with the step named and the last good checkpoint kept.

    .venv/bin/python -m pytest -q tests/test_train.py
"""

from __future__ import annotations

import pytest
import torch

from conftest import interrupt_at, make_trainer, tiny_recipe
from pipeline.errors import NonFiniteLossError
from pipeline.model.gpt import UNetGPT
from pipeline.stages.train import CHECKPOINT


@pytest.mark.parametrize("loader", ["sequential", "coprime"])
def test_resume_after_interrupt_matches_uninterrupted_run(small_data, tmp_path, loader):
    # checkpoint_every=4 and an interruption at step 6: the Ctrl-C checkpoint (step 6), not the
    # periodic one, must carry the run, including optimizer moments, EMA, loader and RNG.
    recipe = tiny_recipe(f"train.loader={loader}", "train.coprime.queue_depth=2")
    full = make_trainer(recipe, small_data, tmp_path / "full")
    full.run()

    first = make_trainer(recipe, small_data, tmp_path / "resumed", progress=interrupt_at(6))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert saved["step"] == 6
    second = make_trainer(recipe, small_data, tmp_path / "resumed")
    result = second.run()

    assert result.resumed_from == 6 and result.steps == recipe.train.max_steps
    for (k, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    for a, b in zip(full.ema.state_dict()["shadow"].values(), second.ema.state_dict()["shadow"].values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in second.history]


def test_nan_loss_stops_names_step_and_keeps_checkpoint(small_data, tmp_path, monkeypatch):
    recipe = tiny_recipe()
    original = UNetGPT.training_loss

    def poisoned(self, ids, targets, step=0):
        loss, aux = original(self, ids, targets, step)
        return (loss * float("nan") if step >= 6 else loss), aux

    monkeypatch.setattr(UNetGPT, "training_loss", poisoned)
    trainer = make_trainer(recipe, small_data, tmp_path)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.run()
    msg = str(e.value)
    assert "at step 7" in msg and "last good checkpoint (step 4)" in msg
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert kept["step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_checkpoint_from_another_configuration_starts_fresh_and_keeps_the_old_one(small_data, tmp_path):
    make_trainer(tiny_recipe("train.max_steps=4"), small_data, tmp_path).run()
    result = make_trainer(tiny_recipe("train.max_steps=4", "optim.matrix_lr=0.01"), small_data, tmp_path).run()
    assert result.resumed_from is None and result.steps == 4
    assert torch.load(tmp_path / "ckpt.stale.pt", weights_only=False)["step"] == 4
    # an eval-only change resumes (here: finds the run complete) instead of retraining
    recipe = tiny_recipe("train.max_steps=4", "optim.matrix_lr=0.01", "eval.stride=8")
    again = make_trainer(recipe, small_data, tmp_path)
    assert again.run().resumed_from == 4


def test_priming_steps_leave_no_trace(small_data, tmp_path):
    """PR #684's 20 compile-priming steps: model, optimizer, EMA, loader and RNG are restored."""
    plain = make_trainer(tiny_recipe("train.max_steps=5"), small_data, tmp_path / "plain")
    plain.run()
    primed = make_trainer(tiny_recipe("train.max_steps=5", "train.prime_steps=3"), small_data, tmp_path / "primed")
    result = primed.run()
    assert result.steps == 5 and result.tokens_seen == 5 * 256
    for (k, a), b in zip(plain.model.state_dict().items(), primed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs: priming leaked into training"
