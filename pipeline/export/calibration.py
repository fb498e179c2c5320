"""Calibration: the data a quantization scheme may ask for, gathered inside the training budget.

    schemes = calibrating_schemes(recipe)          # schemes of any plan that declare `calibrate`
    key = calibration_key(recipe)                  # what of it the train stage's cache key holds
    result, seconds = calibrate(recipe, model, shard_paths, dist_info, log)   # train stage
    atomic_torch_save(result, path); load_calibration(path)                   # train -> export

A scheme of pipeline.export.codec may declare `calibrate(model, batches) -> {tensor name: tensor}`:
GPTQ-style schemes need statistics of the trained model on real inputs (per-layer input Hessians,
pg_mechanics.md §4.1.4). The challenge counts every access to training data against the 600 s
training budget, which is why the records end training early by a reserve (GPTQ_RESERVE_MS) and
collect their Hessians inside it. Here:

- the train stage calls `calibrate` right after the last step, on the weights it exports (the EMA
  when enabled), once per calibrating scheme named by `quant.rules` or a `quant.compare` plan;
- `batches` is an iterator of `quant.calibration_batches` (inputs, targets) training micro-batches
  [B, seq_len] (int64, on the model's device), read afresh from the start of this rank's training
  shards; the hook takes as many of them as it needs;
- schemes that share one hook (gptq5 ... gptq8 all gather the same Hessians) run it once, and
  each of them gets the same result;
- the seconds it takes are added to the stage's `train_time_s` (the figure `submit` holds to
  600 s) and logged as `calibration_time_s`; a recipe with such a scheme leaves room for it with
  `train.max_wallclock_s`, as the records did;
- every rank runs it on its own batches (a hook that wants all ranks' statistics all-reduces them
  itself); rank 0's result is written beside the weights and the export stage hands each tensor's
  entry to its scheme's `encode` as `calibration`.

A recipe whose schemes declare no hook pays nothing: no batch is read and no file is written.
Runtime-pure: the submission script runs the same train and export stages.
"""

from __future__ import annotations

import time
import itertools
from typing import Callable, Iterator

import torch

from pipeline.config import Recipe
from pipeline.export.codec import get_scheme


def calibrating_schemes(recipe: Recipe) -> list[str]:
    """Names of the schemes, in any of the recipe's plans, that declare a calibrate hook."""
    rules = [*recipe.quant.rules, *(r for plan in recipe.quant.compare for r in plan.rules)]
    return sorted({r.scheme for r in rules if get_scheme(r.scheme) is not None
                   and get_scheme(r.scheme).calibrate is not None})


def calibration_key(recipe: Recipe) -> dict:
    """What the train stage's cache key must hold of the calibration ({} when nothing calibrates)."""
    names = calibrating_schemes(recipe)
    return {"calibrating_schemes": names, "calibration_batches": recipe.quant.calibration_batches} if names else {}


def training_batches(recipe: Recipe, shard_paths, rank: int, world_size: int,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) micro-batches of this rank's share of the training shards, from
    their start, each one reference rank's micro-batch (batch_tokens / reference_world_size)."""
    from pipeline.data.loader import SequentialLoader

    t = recipe.train
    local_tokens = t.batch_tokens // t.reference_world_size
    loader = SequentialLoader(shard_paths, t.seq_len, rank=rank, world_size=world_size, local_tokens=local_tokens,
                              vocab_size=recipe.model.vocab_size)
    while True:
        x, y = loader.next_batch()
        yield x.to(device), y.to(device)


def calibrate(recipe: Recipe, model: torch.nn.Module, shard_paths, dist_info,
              log: Callable[[str], None] = print) -> tuple[dict | None, float]:
    """({scheme: {tensor name: tensor}}, seconds) for the recipe's calibrating schemes, or
    (None, 0.0) when none declares a hook. The seconds belong to the training budget."""
    names = calibrating_schemes(recipe)
    if not names:
        return None, 0.0
    if dist_info.device.type == "cuda":
        torch.cuda.synchronize(dist_info.device)
    t0 = time.perf_counter()
    result, by_hook = {}, {}
    for name in names:
        hook = get_scheme(name).calibrate
        if hook not in by_hook:
            batches = itertools.islice(training_batches(recipe, shard_paths, dist_info.rank, dist_info.world_size,
                                                        dist_info.device), recipe.quant.calibration_batches)
            out = hook(model, batches)
            if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
                raise TypeError(f"quant scheme {name!r}: calibrate must return {{tensor name: tensor}}, "
                                f"got {type(out)}")
            by_hook[hook] = {k: v.detach().cpu() for k, v in out.items()}
        result[name] = by_hook[hook]
    if dist_info.device.type == "cuda":
        torch.cuda.synchronize(dist_info.device)
    seconds = time.perf_counter() - t0
    log(f"calibration schemes={','.join(names)} calibration_time_s={seconds:.1f} (counted in train_time)")
    return result, seconds


def load_calibration(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
