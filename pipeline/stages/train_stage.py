"""The train stage (pipeline.stages.sequence): train (or resume) with pipeline.stages.train.Trainer,
run any calibrating quantization scheme's hook on the exported weights (its seconds count as training
time), and write the exported (EMA) weights. Its cache key is the training config plus the
calibration settings, so a plan that adds a calibrating scheme reruns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.config import Recipe
from pipeline.distributed import DistInfo, barrier
from pipeline.fileio import file_sha256
from pipeline.stages.base import Context, Stage
from pipeline.fileio import atomic_torch_save
from pipeline.stages.train import Trainer, TrainResult, training_config


def train(recipe: Recipe, shard_paths, out_dir: Optional[Path], dist_info: DistInfo, log=print, progress=None,
          validate=None, stop_at_step=None, checkpoint_key: Optional[dict] = None
          ) -> tuple[TrainResult, torch.nn.Module]:
    """Run (or resume) training; returns the result and the model holding the exported weights (the
    EMA when enabled)."""
    trainer = Trainer(recipe, shard_paths, out_dir, dist_info, log=log, progress=progress,
                      checkpoint_key=checkpoint_key)
    result = trainer.run(validate=validate, stop_at_step=stop_at_step)
    return result, trainer.ema_model()


# ---------------------------------------------------------------------------------------- the stage

WEIGHTS = "weights.pt"  # the exported (EMA) state_dict, fp32 on the CPU; the export stage reads it
# What quantization schemes with a calibrate hook gathered from training data (only written when
# a plan uses one; pipeline.export.calibration).
CALIBRATION = "calibration.pt"


def _run_train_stage(ctx: Context) -> dict:
    r = ctx.recipe
    if ctx.preflight is not None:
        ctx.preflight(r, ctx.dist, ctx.log)
    progress = ctx.progress_factory(r.train.max_steps) if ctx.progress_factory and ctx.dist.is_main else None
    validate = None
    if r.train.val_every:
        from pipeline.stages.evaluate import make_validator

        validate = make_validator(ctx.data, r, ctx.dist)
    try:
        result, exported = train(r, ctx.data.train_shards, ctx.checkpoint_dir, ctx.dist, log=ctx.log,
                                             progress=progress, validate=validate,
                                             checkpoint_key=ctx.checkpoint_key)
    finally:
        if progress is not None:
            progress.close()
    # A quantization scheme that calibrates on training data does it now, on the exported weights,
    # and its seconds count as training time (pipeline.export.calibration); free when none does.
    from pipeline.export.calibration import calibrate

    calibration, calibration_s = calibrate(r, exported, ctx.data.train_shards, ctx.dist, ctx.log)
    weights = ctx.path("train", WEIGHTS)
    if ctx.dist.is_main:
        weights.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({k: v.detach().cpu() for k, v in exported.state_dict().items()}, weights)
        if calibration is not None:
            atomic_torch_save(calibration, ctx.path("train", CALIBRATION))
    barrier(ctx.dist)
    ctx.log(f"train_done steps={result.steps} train_time={result.train_time_s:.1f}s tokens_seen={result.tokens_seen} "
            f"stopped_by={result.stopped_by} exported={'ema' if r.ema.enabled else 'raw'} weights")
    outputs = {"steps": result.steps, "train_time_s": result.train_time_s + calibration_s,
               "tokens_seen": result.tokens_seen, "stopped_by": result.stopped_by, "history": result.history,
               "weights_sha256": file_sha256(weights)}
    if calibration is not None:
        outputs |= {"calibration_time_s": calibration_s,
                    "calibration_sha256": file_sha256(ctx.path("train", CALIBRATION))}
    return outputs


def _train_stage_key(ctx: Context) -> dict:
    # The calibrating schemes run inside this stage, so a plan that adds one (or changes how many
    # batches they see) reruns it.
    from pipeline.export.calibration import calibration_key

    return training_config(ctx.recipe) | calibration_key(ctx.recipe)


TRAIN = Stage("train", depends_on=_train_stage_key, data_inputs=("train",), files=(WEIGHTS,),
              run=_run_train_stage)
