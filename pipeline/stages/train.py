"""Stage `train`: optimise the recipe's model, with an fp32 EMA shadow, resumably.

    result = train(recipe, shard_paths, out_dir, dist_info, log=print)

One optimizer step = `reference_world_size // world_size` micro-steps, so a single process
follows the reference 8-GPU trajectory. The loop saves `out_dir/ckpt.pt` (model, optimizers,
EMA, grad-conditioning state, step, loader position, RNG states, elapsed training time) every
`checkpoint_every` steps and on Ctrl-C; a later call resumes from it and continues on the same trajectory.
A NaN/inf loss stops the run, keeps the last good checkpoint and names the step.

Runtime-pure (bundled into the submission script): imports torch/numpy and pipeline only.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Recipe, to_dict
from pipeline.distributed import DistInfo, all_reduce_max, seed_everything
from pipeline.errors import NonFiniteLossError, UserError
from pipeline.model import build_model
from pipeline.optim.build import build_optimizers
from pipeline.optim.grad_transforms import (GradConditioningState, check_grad_conditioning, clip_grad_norm,
                                            condition_gradients, nan_to_num_)
from pipeline.optim.schedule import apply_schedule, lr_multiplier, muon_momentum
from pipeline.stages.ema import EMA

CHECKPOINT = "ckpt.pt"


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    tokens_seen: int
    history: list = field(default_factory=list)  # per logged step: step, loss, lr_mul, train_time
    resumed_from: Optional[int] = None


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    ref = recipe.train.reference_world_size
    if ref % world_size:
        raise UserError(f"train.reference_world_size ({ref}) must be a multiple of the world size "
                        f"({world_size}); run with a number of processes that divides it.")
    return ref // world_size


class MicroStepLoaders:
    """The coprime loader for one process of a run with gradient accumulation.

    PR #684 plans one global batch of batch_tokens / seq_len windows per optimizer step and rank
    r takes windows r, r + W, ... With A accumulation micro-steps, micro-step m of rank r acts
    as virtual rank m*W + r of a world of A*W, so one process reads exactly the windows the
    reference multi-GPU run reads (and the gradient is the same mean over them)."""

    def __init__(self, recipe: Recipe, shard_paths, dist_info: DistInfo, accum: int):
        from pipeline.data.coprime_loader import CoprimeShardLoader

        t, world = recipe.train, dist_info.world_size
        step_seqs = t.batch_tokens // t.seq_len
        self.loaders = [CoprimeShardLoader(shard_paths, t.seq_len, step_seqs, rank=m * world + dist_info.rank,
                                           world_size=accum * world, cfg=t.coprime, device=dist_info.device)
                        for m in range(accum)]
        self.micro = 0

    def next_batch(self):
        batch = self.loaders[self.micro].next_batch()
        self.micro = (self.micro + 1) % len(self.loaders)
        return batch

    def state_dict(self) -> dict:
        return {"micro": self.micro, "loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        self.micro = state["micro"]
        for ld, s in zip(self.loaders, state["loaders"]):
            ld.load_state_dict(s)

    def close(self) -> None:
        for ld in self.loaders:
            ld.close()


def make_loader(recipe: Recipe, shard_paths, dist_info: DistInfo, accum: int, local_tokens: int):
    """The recipe's training loader; either kind serves one micro-batch per `next_batch()`."""
    t = recipe.train
    if t.loader == "coprime":
        return MicroStepLoaders(recipe, shard_paths, dist_info, accum)
    from pipeline.data.loader import SequentialLoader

    return SequentialLoader(shard_paths, t.seq_len, rank=dist_info.rank, world_size=dist_info.world_size,
                            local_tokens=local_tokens)


def training_config(recipe: Recipe) -> dict:
    """What determines the training trajectory (eval, TTT and export settings do not)."""
    return {k: to_dict(getattr(recipe, k)) for k in ("model", "train", "optim", "ema")} | {"seed": recipe.seed}


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, recipe: Recipe, shard_paths, out_dir: Path, dist_info: DistInfo,
                 log: Callable[[str], None] = print, progress: Optional[Callable] = None):
        self.recipe, self.out_dir, self.dist, self.log, self.progress = recipe, Path(out_dir), dist_info, log, progress
        self.out_dir.mkdir(parents=True, exist_ok=True)
        t = recipe.train
        self.accum = grad_accum_steps(recipe, dist_info.world_size)
        micro_tokens_global = t.batch_tokens // self.accum
        if micro_tokens_global % (t.seq_len * dist_info.world_size):
            raise UserError(f"train.batch_tokens ({t.batch_tokens}) must split into {self.accum} micro-steps x "
                            f"{dist_info.world_size} ranks of whole train.seq_len ({t.seq_len}) sequences.")
        self.local_tokens = micro_tokens_global // dist_info.world_size
        seed_everything(recipe.seed)
        self.model = build_model(recipe.model).to(dist_info.device)
        self.optimizers = build_optimizers(self.model, recipe.optim, rank=dist_info.rank,
                                           world_size=dist_info.world_size)
        self.ema = EMA(self.model, recipe.ema.decay) if recipe.ema.enabled else None
        check_grad_conditioning(recipe.optim.grad_conditioning)  # a bad rule pattern fails here, not mid-run
        # mode=hypergradient's learned per-tensor scalars: checkpointed like the optimizers.
        self.grad_state = GradConditioningState()
        self.shard_paths = list(shard_paths)
        self.loader = make_loader(recipe, self.shard_paths, dist_info, self.accum, self.local_tokens)
        use_compile = t.compile == "on" or (t.compile == "auto" and dist_info.device.type == "cuda")
        loss_module = _LossModule(self.model)
        self.step_model = torch.compile(loss_module) if use_compile else loss_module
        if dist_info.world_size > 1:
            self.step_model = DistributedDataParallel(
                self.step_model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        self.step, self.train_time, self.tokens_seen = 0, 0.0, 0
        self.history: list = []

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "train_time": self.train_time, "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size, "model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "ema": self.ema.state_dict() if self.ema else None, "loader": self.loader.state_dict(),
                "grad_conditioning": self.grad_state.state_dict(), "rng": _rng_state(), "history": self.history,
                "training_config": training_config(self.recipe)}

    def _rank_optim_path(self) -> Path:
        return self.out_dir / f"optim_rank{self.dist.rank}.pt"

    def save_checkpoint(self) -> None:
        # Muon keeps each matrix's momentum only on the rank that owns it, so with several
        # ranks every rank saves its own optimizer state beside rank 0's checkpoint.
        if self.dist.world_size > 1:
            _atomic_save({"step": self.step, "optimizers": [o.state_dict() for o in self.optimizers]},
                         self._rank_optim_path())
        if self.dist.is_main:
            _atomic_save(self._state(), self.out_dir / CHECKPOINT)

    def try_resume(self) -> Optional[int]:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return None
        state = torch.load(path, map_location=self.dist.device, weights_only=False)
        if state["training_config"] != training_config(self.recipe):
            # A changed recipe starts over; the old checkpoint is kept aside, not overwritten.
            stale = path.with_name("ckpt.stale.pt")
            os.replace(path, stale)
            self.log(f"checkpoint {path} is from a different training configuration; starting fresh "
                     f"(old checkpoint kept as {stale})")
            return None
        if state.get("world_size", 1) != self.dist.world_size:
            raise UserError(f"{path} was written by {state.get('world_size', 1)} processes; resume with the same "
                            f"number (now {self.dist.world_size}), or delete {self.out_dir} to start over.")
        optim_states = state["optimizers"]
        if self.dist.world_size > 1:
            mine = torch.load(self._rank_optim_path(), map_location=self.dist.device, weights_only=False)
            if mine["step"] != state["step"]:
                raise UserError(f"{self._rank_optim_path()} is from step {mine['step']}, the checkpoint from step "
                                f"{state['step']}; delete {self.out_dir} to start over.")
            optim_states = mine["optimizers"]
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, optim_states):
            opt.load_state_dict(s)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.grad_state.load_state_dict(state["grad_conditioning"])
        self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        self.step, self.train_time, self.tokens_seen = state["step"], state["train_time"], state["tokens_seen"]
        self.history = state["history"]
        return self.step

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> tuple[float, float]:
        r = self.recipe
        lr_mul = lr_multiplier(self.step, r.train, self.train_time)
        apply_schedule(self.optimizers, lr_mul, muon_momentum(self.step, r.optim))
        total = torch.zeros((), device=self.dist.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            sync = micro == self.accum - 1 or not isinstance(self.step_model, DistributedDataParallel)
            ctx = self.step_model.no_sync() if not sync else _null()
            with ctx, self._autocast():
                loss, _aux = self.step_model(x, y, self.step)
            (loss / self.accum).backward()
            total += loss.detach()
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        if r.train.nan_to_num_grads:
            nan_to_num_(params)
        condition_gradients(named, r.optim.grad_conditioning, self.grad_state)
        grad_norm = clip_grad_norm(params, r.train.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.tokens_seen += r.train.batch_tokens
        return float(total.item()) / self.accum, float(grad_norm)

    # ------------------------------------------------------------------ priming
    def prime(self) -> None:
        """Compile-priming steps on real batches, then restore everything (not timed)."""
        n = self.recipe.train.prime_steps
        if n <= 0:
            return
        snapshot = copy.deepcopy({"model": self.model.state_dict(),
                                  "opt": [o.state_dict() for o in self.optimizers],
                                  "ema": self.ema.state_dict() if self.ema else None,
                                  "grad_conditioning": self.grad_state.state_dict(),
                                  "loader": self.loader.state_dict(), "rng": _rng_state()})
        for _ in range(n):
            self.train_step()
        self.model.load_state_dict(snapshot["model"])
        for opt, s in zip(self.optimizers, snapshot["opt"]):
            opt.load_state_dict(s)
        if self.ema is not None:
            self.ema.load_state_dict(snapshot["ema"])
        self.grad_state.load_state_dict(snapshot["grad_conditioning"])
        self.loader.load_state_dict(snapshot["loader"])
        _set_rng_state(snapshot["rng"])
        self.tokens_seen = 0
        self.log(f"priming_done steps={n} (state restored; not timed)")

    # ------------------------------------------------------------------ the loop
    def run(self, validate: Optional[Callable] = None, stop_at_step: Optional[int] = None) -> TrainResult:
        t = self.recipe.train
        resumed = self.try_resume()
        if resumed is not None:
            self.log(f"resume step={resumed} train_time={self.train_time:.1f}s from={self.out_dir / CHECKPOINT}")
        else:
            self.prime()
        last_good = resumed
        try:
            while self.step < t.max_steps:
                if t.max_wallclock_s and all_reduce_max(self.train_time, self.dist.device) >= t.max_wallclock_s:
                    self.log(f"stopping_early: wallclock_cap train_time={self.train_time:.1f}s step={self.step}")
                    break
                if stop_at_step is not None and self.step >= stop_at_step:
                    break
                self._sync()
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                self._sync()
                self.train_time += time.perf_counter() - t0
                self.step += 1
                if not math.isfinite(loss):
                    where = (f"the last good checkpoint (step {last_good}) is kept at {self.out_dir / CHECKPOINT}"
                             if last_good is not None else "no checkpoint had been written yet")
                    raise NonFiniteLossError(
                        f"training loss became {loss} at step {self.step}; stopped. {where}. Lower optim.*_lr or "
                        f"set train.grad_clip, then rerun (it resumes from the checkpoint).")
                self._after_step(loss, grad_norm, validate)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_good = self.step
            self.save_checkpoint()
        except KeyboardInterrupt:
            # Nothing lost on interruption: the last *completed* step is saved before exiting.
            self.save_checkpoint()
            self.log(f"interrupted at step={self.step}; checkpoint saved, rerun to resume")
            raise
        finally:
            if hasattr(self.loader, "close"):
                self.loader.close()  # stop a prefetch thread (PR #684's never stopped)
        return TrainResult(self.step, self.train_time, self.tokens_seen, self.history, resumed)

    def _after_step(self, loss: float, grad_norm: float, validate) -> None:
        t = self.recipe.train
        lr_mul = lr_multiplier(self.step, t, self.train_time)
        rec = {"step": self.step, "loss": loss, "lr_mul": lr_mul, "train_time": self.train_time}
        self.history.append(rec)
        if self.progress is not None:
            self.progress(self.step, t.max_steps, rec)
        if self.step % t.log_every == 0 or self.step == 1 or self.step == t.max_steps:
            avg = self.train_time / self.step
            left = (t.max_steps - self.step) * avg
            if t.max_wallclock_s:
                left = min(left, max(t.max_wallclock_s - self.train_time, 0.0))
            self.log(f"step={self.step}/{t.max_steps} loss={loss:.4f} lr_mul={lr_mul:.4f} grad_norm={grad_norm:.3f} "
                     f"train_time={self.train_time:.1f}s step_avg={avg * 1000:.1f}ms "
                     f"tok_s={self.tokens_seen / max(self.train_time, 1e-9):.0f} eta={left:.0f}s")
        if validate is not None and t.val_every and self.step % t.val_every == 0:
            metrics = validate(self.ema_model() if self.ema else self.model)  # untimed
            rec.update(metrics)
            self.log(f"val step={self.step} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def ema_model(self):
        """A copy of the model holding the EMA weights (what is exported)."""
        m = copy.deepcopy(self.model)
        if self.ema is not None:
            self.ema.copy_to(m)
        return m

    def _sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()


class _LossModule(torch.nn.Module):
    """Wraps `model.training_loss` as a forward, so compile and DDP see the whole loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, step: int):
        return self.model.training_loss(x, y, step)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(recipe: Recipe, shard_paths, out_dir: Path, dist_info: DistInfo, log=print, progress=None,
          validate=None, stop_at_step=None) -> tuple[TrainResult, torch.nn.Module]:
    """Run (or resume) training; returns the result and the model holding the exported weights."""
    trainer = Trainer(recipe, shard_paths, out_dir, dist_info, log=log, progress=progress)
    result = trainer.run(validate=validate, stop_at_step=stop_at_step)
    return result, trainer.ema_model()
