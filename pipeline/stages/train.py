"""Stage `train`: optimise the recipe's model, with an fp32 EMA shadow, resumably.

    result, model = train(recipe, shard_paths, ckpt_dir, dist_info, log=print)
    TRAIN                          # the stage object of pipeline.stages.sequence

One optimizer step = `reference_world_size // world_size` micro-steps, so a single process
follows the reference 8-GPU trajectory. With a checkpoint folder the loop saves `ckpt.pt` (model,
optimizers, EMA, grad-conditioning state, step, loader position, RNG states, elapsed training
time, and the key it was written under) every `checkpoint_every` steps and on Ctrl-C/SIGTERM; a
later call resumes from it only under the same key (training config, training data, code) and
continues on the same trajectory. A signal only sets a flag: the loop stops at the next step
boundary, so the saved state is never taken mid-step and the resumed run is bitwise the
uninterrupted one. A non-finite loss, gradient norm or parameter stops training at that step,
naming it; a checkpoint is written only from a finite state, so "the last good checkpoint" is good.

Runtime-pure (bundled into the submission script): imports torch/numpy and pipeline only.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Recipe, to_dict
from pipeline.distributed import DistInfo, barrier, seed_everything
from pipeline.errors import NonFiniteLossError, UserError
from pipeline.fileio import atomic_path, file_sha256
from pipeline.model import build_model
from pipeline.optim.build import build_optimizers
from pipeline.optim.grad_transforms import (GradConditioningState, check_grad_conditioning, clip_grad_norm,
                                            condition_gradients, nan_to_num_)
from pipeline.optim.schedule import apply_schedule, lr_multiplier, muon_momentum
from pipeline.stages.base import Context, Stage
from pipeline.stages.ema import EMA

CHECKPOINT = "ckpt.pt"


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    tokens_seen: int
    history: list = field(default_factory=list)  # per logged step: step, loss, lr_mul, train_time
    resumed_from: Optional[int] = None
    stopped_by: str = "max_steps"  # or "wallclock" (train.max_wallclock_s) or "stop_at_step"


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """`out_dir`: the checkpoint folder, or None for no checkpoints at all (the shipped script).
    `checkpoint_key`: what a checkpoint must have been written under to be resumed (default: the
    training config); pgolf run adds the training data's and the code's content hashes."""

    def __init__(self, recipe: Recipe, shard_paths, out_dir: Optional[Path], dist_info: DistInfo,
                 log: Callable[[str], None] = print, progress: Optional[Callable] = None,
                 checkpoint_key: Optional[dict] = None):
        self.recipe, self.dist, self.log, self.progress = recipe, dist_info, log, progress
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_key = checkpoint_key if checkpoint_key is not None else {"training": training_config(recipe)}
        self._stop_signal: Optional[int] = None
        t = recipe.train
        self.accum = grad_accum_steps(recipe, dist_info.world_size)
        micro_tokens_global = t.batch_tokens // self.accum
        if micro_tokens_global % (t.seq_len * dist_info.world_size):
            raise UserError(f"train.batch_tokens ({t.batch_tokens}) must split into {self.accum} micro-steps x "
                            f"{dist_info.world_size} ranks of whole train.seq_len ({t.seq_len}) sequences.")
        self.local_tokens = micro_tokens_global // dist_info.world_size
        # Each loaded micro-batch runs in chunks of train.micro_batch_seqs sequences (0 = all at
        # once): the same tokens and the same mean loss, less activation memory per pass.
        local_seqs, mbs = self.local_tokens // t.seq_len, t.micro_batch_seqs
        if mbs < 0 or (mbs and local_seqs % mbs):
            fits = [d for d in range(1, local_seqs + 1) if local_seqs % d == 0]
            raise UserError(f"train.micro_batch_seqs ({mbs}) must be 0 (off) or divide the {local_seqs} sequences "
                            f"each rank runs per micro-step; one of {fits}.")
        self.chunk_seqs = mbs or local_seqs
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
                "checkpoint_key": self.checkpoint_key}

    def _rank_optim_path(self) -> Path:
        return self.out_dir / f"optim_rank{self.dist.rank}.pt"

    def save_checkpoint(self) -> bool:
        """Write the checkpoint (no-op without a folder). Refuses a non-finite state, so whatever
        checkpoint exists is a good one; returns whether it wrote."""
        if self.out_dir is None:
            return False
        bad = self.non_finite_state()
        if bad:
            self.log(f"checkpoint not written: {bad} is not finite; the previous checkpoint is kept")
            return False
        # Muon keeps each matrix's momentum only on the rank that owns it, so with several
        # ranks every rank saves its own optimizer state beside rank 0's checkpoint.
        if self.dist.world_size > 1:
            _atomic_save({"step": self.step, "optimizers": [o.state_dict() for o in self.optimizers]},
                         self._rank_optim_path())
        if self.dist.is_main:
            _atomic_save(self._state(), self.out_dir / CHECKPOINT)
        return True

    def non_finite_state(self) -> Optional[str]:
        """The first parameter, EMA tensor or optimizer-state tensor holding NaN/inf, or None."""
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"parameter {name}"
        if self.ema is not None:
            for name, t in self.ema.state_dict().items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"EMA tensor {name}"
        for i, opt in enumerate(self.optimizers):
            for state in opt.state.values():
                for key, t in state.items():
                    if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"optimizer {i} state {key}"
        return None

    def try_resume(self) -> Optional[int]:
        if self.out_dir is None:
            return None
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return None
        state = torch.load(path, map_location=self.dist.device, weights_only=False)
        written_under = state.get("checkpoint_key") or {}
        if written_under != self.checkpoint_key:
            # Never resume what another config, other data or other code produced; keep it aside.
            changed = sorted(k for k in set(written_under) | set(self.checkpoint_key)
                             if written_under.get(k) != self.checkpoint_key.get(k))
            stale = path.with_name("ckpt.stale.pt")
            os.replace(path, stale)
            self.log(f"checkpoint {path} was written for a different {'/'.join(changed) or 'run'}; starting fresh "
                     f"(old checkpoint kept as {stale.name})")
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
        chunks = self.local_tokens // (r.train.seq_len * self.chunk_seqs)
        # Every pass holds the same number of tokens, so the mean of the pass means is the
        # step's mean loss: scaling each backward by 1/passes accumulates the unsplit gradient.
        passes = self.accum * chunks
        ddp = isinstance(self.step_model, DistributedDataParallel)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            for c in range(chunks):
                rows = slice(c * self.chunk_seqs, (c + 1) * self.chunk_seqs)
                # DDP all-reduces once per step, in its last backward.
                sync = not ddp or (micro == self.accum - 1 and c == chunks - 1)
                ctx = self.step_model.no_sync() if not sync else _null()
                with ctx, self._autocast():
                    loss, _aux = self.step_model(x[rows], y[rows], self.step)
                (loss / passes).backward()
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
        return float(total.item()) / passes, float(grad_norm)

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
        self.log(f"train_setup device={self.dist.device} threads={torch.get_num_threads()}")
        resumed = self.try_resume()
        if resumed is not None:
            self.log(f"resume step={resumed} train_time={self.train_time:.1f}s from={self.out_dir / CHECKPOINT}")
        else:
            self.prime()
        last_good = resumed
        self.stopped_by = "max_steps"
        restore = self._catch_signals()
        try:
            while self.step < t.max_steps:
                train_time, stop = self._collective_state()
                if stop:
                    # A signal arrived during the last step: stop here, at a step boundary.
                    saved = self.save_checkpoint()
                    self.log(f"interrupted at step={self.step}; "
                             + ("checkpoint saved, rerun to resume" if saved else "no checkpoint (none configured)"))
                    raise KeyboardInterrupt
                if t.max_wallclock_s and train_time >= t.max_wallclock_s:
                    self.log(f"stopping_early: wallclock_cap train_time={self.train_time:.1f}s step={self.step}")
                    self.stopped_by = "wallclock"
                    break
                if stop_at_step is not None and self.step >= stop_at_step:
                    self.stopped_by = "stop_at_step"
                    break
                self._sync()
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                self._sync()
                self.train_time += time.perf_counter() - t0
                self.step += 1
                self._check_health(loss, grad_norm, last_good)
                self._after_step(loss, grad_norm, validate)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.save_checkpoint():
                    last_good = self.step
            self.save_checkpoint()
        except KeyboardInterrupt:
            if self._stop_signal is None:
                # Raised mid-step (a second Ctrl-C): that state is not a step boundary, so nothing
                # is saved; the last scheduled checkpoint stays the resume point.
                self.log(f"interrupted inside step {self.step + 1}; resume point: "
                         + (f"step {last_good}" if last_good is not None else "the start"))
            raise
        finally:
            restore()
            if hasattr(self.loader, "close"):
                self.loader.close()  # stop a prefetch thread (PR #684's never stopped)
        return TrainResult(self.step, self.train_time, self.tokens_seen, self.history, resumed, self.stopped_by)

    # ------------------------------------------------------------------ interruption and health
    def _catch_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM set a flag the loop reads at the next step boundary; a second signal
        interrupts at once. Returns a function restoring the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # handlers can only be installed from the main thread
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.log(f"signal {signal.Signals(signum).name}: stopping after step {self.step + 1} "
                     "(send it again to stop at once)")

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _collective_state(self) -> tuple[float, bool]:
        """(max training time over ranks, whether any rank was signalled): one all-reduce, so every
        rank stops at the same step boundary."""
        stop = self._stop_signal is not None
        if self.dist.world_size == 1 or not torch.distributed.is_initialized():
            return self.train_time, stop
        both = torch.tensor([self.train_time, float(stop)], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        return float(both[0]), bool(both[1])

    def _parameters_finite(self) -> bool:
        # One host sync for all parameters (the slow, naming pass runs only on failure).
        flags = torch.stack([torch.isfinite(p.detach()).all() for p in self.model.parameters()])
        return bool(flags.all())

    def _check_health(self, loss: float, grad_norm: float, last_good: Optional[int]) -> None:
        """Stop at this step, naming what is non-finite: the loss, the gradient norm or a parameter."""
        what = None
        if not math.isfinite(loss):
            what = f"training loss became {loss}"
        elif not math.isfinite(grad_norm):
            what = f"the gradient norm became {grad_norm}"
        elif not self._parameters_finite():
            what = f"{self.non_finite_state() or 'a parameter'} became non-finite"
        if what is None:
            return
        if last_good is not None:
            where = (f"the last good checkpoint (step {last_good}) is kept at {self.out_dir / CHECKPOINT}; a rerun "
                     "resumes from it")
        else:
            where = "no checkpoint had been written yet"
        raise NonFiniteLossError(f"{what} at step {self.step}; stopped. {where}. Lower optim.*_lr or set "
                                 f"train.grad_clip, then rerun.")

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
    from pipeline.export.calibration import calibrate, save_calibration

    calibration, calibration_s = calibrate(r, exported, ctx.data.train_shards, ctx.dist, ctx.log)
    weights = ctx.path("train", WEIGHTS)
    if ctx.dist.is_main:
        weights.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({k: v.detach().cpu() for k, v in exported.state_dict().items()}, weights)
        if calibration is not None:
            save_calibration(calibration, ctx.path("train", CALIBRATION))
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
    # The calibrating schemes run inside this stage, so a plan that adds one reruns it.
    from pipeline.export.calibration import calibrating_schemes

    names = calibrating_schemes(ctx.recipe)
    return training_config(ctx.recipe) | ({"calibrating_schemes": names} if names else {})


TRAIN = Stage("train", depends_on=_train_stage_key, data_inputs=("train",), files=(WEIGHTS,),
              run=_run_train_stage)
