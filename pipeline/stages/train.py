"""The Trainer: optimise the recipe's model, with an fp32 EMA shadow, resumably (the train stage,
pipeline.stages.train_stage, runs it).

    trainer = Trainer(recipe, shard_paths, ckpt_dir, dist_info, log=print)
    result = trainer.run(); model = trainer.ema_model()

One optimizer step = `reference_world_size // world_size` micro-steps, so a single process follows
the reference 8-GPU trajectory (its batches: pipeline.stages.train_loaders). With a checkpoint
folder (pgolf run) the loop saves `ckpt.pt` every `checkpoint_every` steps and on Ctrl-C/SIGTERM,
and a later call resumes from it on the same trajectory (pipeline.stages.checkpoint, imported by
name so the shipped script, which has no folder, does not carry it). A signal only sets a flag: the
loop stops at the next step boundary, so the saved state is never taken mid-step and the resumed run
is bitwise the uninterrupted one. A non-finite loss, gradient norm or parameter stops training at
that step, naming it; a checkpoint is written only from a finite state, so "the last good
checkpoint" is good.

Fast paths (pipeline.stages.fast_paths, resolved per device from train.compile / autocast /
attention_kernel / host_sync_every / cpu_workers / coprime.copy_stream and optim.muon_compile; "auto" is the CUDA fast
path on CUDA and the plain path on the CPU, whose numbers it leaves bitwise unchanged): bf16
autocast, torch.compile of the loss module and of Newton-Schulz, one named SDPA kernel (flash takes
grouped KV heads), the coprime loader's pinned-memory copy stream, and no host synchronisation
inside a step: the loss, the gradient norm and a parameter-health flag stay on the device and are
read every host_sync_every steps and before every log line, validation, checkpoint and stop, so a
non-finite value still stops training naming the step it appeared at. Between sync points the
clock runs on host time and the wait for the device is added at the sync, as the baseline times
its steps; validation stays off the clock. On the CPU, cpu_workers shares a step's passes among
threads of the process (pipeline.stages.cpu_workers, likewise imported by name).

Runtime-pure (bundled into the submission script): imports torch/numpy and pipeline only.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Recipe, to_dict
from pipeline.distributed import DistInfo, seed_everything
from pipeline.errors import NonFiniteLossError, UserError
from pipeline.model import build_model
from pipeline.optim.build import build_optimizers
from pipeline.optim.muon import Muon
from pipeline.optim.grad_transforms import (GradConditioningState, check_grad_conditioning, condition_gradients,
                                            nan_to_num_)
from pipeline.optim.schedule import apply_schedule, lr_multiplier, muon_momentum
from pipeline.stages.ema import EMA
from pipeline.stages.fast_paths import clip_grad_norm_on_device, resolve_fast_paths, sdpa_kernel_context
from pipeline.stages.train_loaders import COPRIME_LOADER_MODULE, grad_accum_steps, make_loader

CHECKPOINT = "ckpt.pt"  # in the checkpoint folder (pipeline.stages.checkpoint)
CHECKPOINT_MODULE = "pipeline.stages.checkpoint"
CPU_WORKERS_MODULE = "pipeline.stages.cpu_workers"


def train_modules(recipe: Recipe) -> list[str]:
    """The modules the train stage imports by name (importlib, so that pipeline.codegen's import scan
    does not ship them with every recipe) that a script for `recipe` must carry: the coprime loader
    and cpu_workers' threads when the recipe uses them. Never the checkpointer."""
    return ([COPRIME_LOADER_MODULE] if recipe.train.loader == "coprime" else []) + \
        ([CPU_WORKERS_MODULE] if recipe.train.cpu_workers > 1 else [])


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    tokens_seen: int
    history: list = field(default_factory=list)  # per logged step: step, loss, lr_mul, train_time
    resumed_from: Optional[int] = None
    stopped_by: str = "max_steps"  # or "wallclock" (train.max_wallclock_s) or "stop_at_step"


def training_config(recipe: Recipe) -> dict:
    """What determines the training trajectory (eval, TTT and export settings do not)."""
    return {k: to_dict(getattr(recipe, k)) for k in ("model", "train", "optim", "ema")} | {"seed": recipe.seed}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@dataclass
class _PendingStep:
    """A finished step whose figures are still on the device (read at the next sync point)."""

    step: int
    train_time: float
    tokens_seen: int
    loss_sum: torch.Tensor  # sum of the passes' mean losses
    grad_norm: torch.Tensor
    healthy: torch.Tensor  # 1.0 if every parameter is finite


class Trainer:
    """`out_dir`: the checkpoint folder, or None for no checkpoints at all (the shipped script).
    `checkpoint_key`: what a checkpoint must have been written under to be resumed (default: the
    training config); pgolf run adds the training data's and the code's content hashes."""

    def __init__(self, recipe: Recipe, shard_paths, out_dir: Optional[Path], dist_info: DistInfo,
                 log: Callable[[str], None] = print, progress: Optional[Callable] = None,
                 checkpoint_key: Optional[dict] = None):
        self.recipe, self.dist, self.log, self.progress = recipe, dist_info, log, progress
        self.checkpoints = None
        if out_dir is not None:
            # Imported by name: the shipped script, which never checkpoints, does not carry it
            # (pipeline.codegen follows import statements only).
            key = checkpoint_key if checkpoint_key is not None else {"training": training_config(recipe)}
            self.checkpoints = importlib.import_module(CHECKPOINT_MODULE).Checkpointer(out_dir, key, log)
        self.stop_signal: Optional[int] = None  # set by the checkpointer's signal handler
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
        self.fast = resolve_fast_paths(recipe, dist_info.device, dist_info.world_size, self.passes_per_step)
        seed_everything(recipe.seed)
        self.model = build_model(recipe.model).to(dist_info.device)
        self.model.plan_training(t.max_steps)  # a trunk that changes with the step schedules from it
        self.optimizers = build_optimizers(self.model, recipe.optim, rank=dist_info.rank,
                                           world_size=dist_info.world_size)
        self.ema = EMA(self.model, recipe.ema.decay) if recipe.ema.enabled else None
        check_grad_conditioning(recipe.optim.grad_conditioning)  # a bad rule pattern fails here, not mid-run
        # mode=hypergradient's learned per-tensor scalars: checkpointed like the optimizers.
        self.grad_state = GradConditioningState()
        self.shard_paths = list(shard_paths)
        self.loader = make_loader(recipe, self.shard_paths, dist_info, self.accum, self.local_tokens)
        loss_module = _LossModule(self.model)
        self.step_model = torch.compile(loss_module) if self.fast.compile else loss_module
        if self.fast.muon_compile:
            for opt in self.optimizers:
                if isinstance(opt, Muon):
                    opt.compile_newton_schulz()
        if dist_info.world_size > 1:
            self.step_model = DistributedDataParallel(
                self.step_model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        self.step, self.train_time, self.tokens_seen = 0, 0.0, 0
        self.history: list = []
        self._pending: list[_PendingStep] = []  # finished steps not yet read on the host
        self._next_sync = 0

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> bool:
        """Write the checkpoint (no-op without a folder); returns whether it wrote."""
        return self.checkpoints is not None and self.checkpoints.save(self)

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

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.fast.autocast is not None:
            return torch.autocast(self.dist.device.type, dtype=self.fast.autocast)
        return torch.autocast(self.dist.device.type, enabled=False)

    def passes_context(self):
        """Autocast and the chosen SDPA kernel around a forward/backward pass (both thread-local
        or global state that each cpu_workers thread must enter itself)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._autocast())
        if self.fast.attention_kernel != "auto":
            stack.enter_context(sdpa_kernel_context(self.fast.attention_kernel))
        return stack

    @property
    def passes_per_step(self) -> int:
        return self.accum * (self.local_tokens // (self.recipe.train.seq_len * self.chunk_seqs))

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss, gradient norm) as floats (one host sync)."""
        total, grad_norm = self.step_on_device()
        return float(total.item()) / self.passes_per_step, float(grad_norm)

    def step_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step without a host sync: returns the sum of the passes' mean losses and
        the gradient norm as device tensors (the mean loss is the sum / passes_per_step)."""
        if self.fast.cpu_workers == 1:
            return self.optimizer_step(self._passes)
        # Imported by name, so only a script whose recipe sets train.cpu_workers > 1 carries it
        # (train_modules; pipeline.codegen).
        return importlib.import_module(CPU_WORKERS_MODULE).step_threaded(self)

    def optimizer_step(self, passes: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step around `passes()`, which runs the forward/backward passes and returns
        the sum of their mean losses."""
        r = self.recipe
        lr_mul = lr_multiplier(self.step, r.train, self.train_time)
        apply_schedule(self.optimizers, lr_mul, muon_momentum(self.step, r.optim))
        total = passes()
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        if r.train.nan_to_num_grads:
            nan_to_num_(params)
        condition_gradients(named, r.optim.grad_conditioning, self.grad_state)
        grad_norm = clip_grad_norm_on_device(params, r.train.grad_clip, self.dist.device)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.tokens_seen += r.train.batch_tokens
        return total, grad_norm

    def _passes(self) -> torch.Tensor:
        r = self.recipe
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
                with ctx, self.passes_context():
                    loss, _aux = self.step_model(x[rows], y[rows], self.step)
                (loss / passes).backward()
                total += loss.detach()
        return total

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict:
        """Model, optimizers, EMA, gradient conditioning, loader position and RNG: what a checkpoint
        keeps (pipeline.stages.checkpoint) and priming restores. References, not copies."""
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "ema": self.ema.state_dict() if self.ema else None,
                "grad_conditioning": self.grad_state.state_dict(), "loader": self.loader.state_dict(),
                "rng": rng_state()}

    def load_training_state(self, state: dict) -> None:
        """Inverse of `training_state`."""
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.grad_state.load_state_dict(state["grad_conditioning"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ priming
    def prime(self) -> None:
        """Compile-priming steps on real batches, then restore everything (not timed)."""
        n = self.recipe.train.prime_steps
        if n <= 0:
            return
        t0 = time.perf_counter()
        snapshot = copy.deepcopy(self.training_state())
        for _ in range(n):
            self.train_step()
        self.load_training_state(snapshot)
        self.tokens_seen = 0
        self.log(f"priming_done steps={n} time={time.perf_counter() - t0:.1f}s (compiles; state restored; not timed)")

    # ------------------------------------------------------------------ the loop
    def run(self, validate: Optional[Callable] = None, stop_at_step: Optional[int] = None) -> TrainResult:
        t = self.recipe.train
        self.log(f"train_setup device={self.dist.device} world_size={self.dist.world_size} accum={self.accum} "
                 f"passes_per_step={self.passes_per_step} threads={torch.get_num_threads()} {self.fast.describe()}")
        resumed = self.checkpoints.resume(self) if self.checkpoints is not None else None
        if resumed is None:
            self.prime()
        last_good = resumed
        self.stopped_by = "max_steps"
        self._pending = []
        restore = self.checkpoints.catch_signals(self) if self.checkpoints is not None else (lambda: None)
        try:
            while self.step < t.max_steps:
                # Stop decisions need the same state on every rank: taken at a sync point (nothing
                # pending) or, in one process, at every step boundary (free there).
                if not self._pending or self.dist.world_size == 1:
                    train_time, stop = self._collective_state()
                    if stop:
                        # A signal arrived during the last step: stop here, at a step boundary.
                        self._drain(validate, last_good)
                        # (only a checkpointer installs the handler that sets the flag)
                        saved = self.save_checkpoint()
                        self.log(f"interrupted at step={self.step}; " + ("checkpoint saved, rerun to resume" if saved
                                                                          else "checkpoint not written"))
                        raise KeyboardInterrupt
                    if t.max_wallclock_s and train_time >= t.max_wallclock_s:
                        self.log(f"stopping_early: wallclock_cap train_time={self.train_time:.1f}s step={self.step}")
                        self.stopped_by = "wallclock"
                        break
                    if not self._pending:
                        self._next_sync = self.step + self._sync_interval(train_time)
                if stop_at_step is not None and self.step >= stop_at_step:
                    self.stopped_by = "stop_at_step"
                    break
                # Host time: on CUDA the step is only queued here; the wait for the device is added
                # at the next sync point (_drain), so train_time is the device's time, as the
                # baseline measures it, without a synchronisation per step.
                t0 = time.perf_counter()
                loss_sum, grad_norm = self.step_on_device()
                healthy = self._parameters_finite_flag()
                self.train_time += time.perf_counter() - t0
                self.step += 1
                self._pending.append(_PendingStep(self.step, self.train_time, self.tokens_seen, loss_sum,
                                                  grad_norm, healthy))
                if self._sync_due(stop_at_step):
                    self._drain(validate, last_good)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.save_checkpoint():
                    last_good = self.step
            self._drain(validate, last_good)
            self.save_checkpoint()
        except KeyboardInterrupt:
            if self.stop_signal is None:
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

    # ------------------------------------------------------------------ host syncs
    def _sync_interval(self, train_time: float) -> int:
        """Steps to the next regular sync point. Near the wall-clock cap every step is one, so the
        stop lands where the cap says (computed from the all-reduced time: the same on every rank)."""
        t, k = self.recipe.train, self.fast.sync_every
        if k > 1 and t.max_wallclock_s and self.step:
            if t.max_wallclock_s - train_time < (k + 1) * train_time / self.step:
                return 1
        return k

    def _sync_due(self, stop_at_step: Optional[int]) -> bool:
        t, s = self.recipe.train, self.step
        return (s >= self._next_sync or s == 1 or s == t.max_steps or s % t.log_every == 0
                or (t.checkpoint_every > 0 and s % t.checkpoint_every == 0)
                or (t.val_every > 0 and s % t.val_every == 0)
                or (stop_at_step is not None and s >= stop_at_step)
                # a signal is read at the next step boundary in one process; ranks read it at
                # their next regular sync point, which they share
                or (self.dist.world_size == 1 and self.stop_signal is not None))

    def _drain(self, validate, last_good: Optional[int]) -> None:
        """The sync point: wait for the device (timed as training), read every pending step's loss,
        gradient norm and health flag in one transfer, then check, record and log them in order."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        self._sync()
        self.train_time += time.perf_counter() - t0
        pending, self._pending = self._pending, []
        pending[-1].train_time = self.train_time
        values = torch.stack([v for p in pending for v in (p.loss_sum, p.grad_norm, p.healthy)]).tolist()
        passes = self.passes_per_step
        for i, p in enumerate(pending):
            loss_sum, grad_norm, healthy = values[3 * i:3 * i + 3]
            loss = loss_sum / passes
            self._check_health(p.step, loss, grad_norm, healthy > 0, last_good)
            self._after_step(p, loss, grad_norm, validate)

    # ------------------------------------------------------------------ interruption and health
    def _collective_state(self) -> tuple[float, bool]:
        """(max training time over ranks, whether any rank was signalled): one all-reduce, so every
        rank stops at the same step boundary."""
        stop = self.stop_signal is not None
        if self.dist.world_size == 1 or not torch.distributed.is_initialized():
            return self.train_time, stop
        both = torch.tensor([self.train_time, float(stop)], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        return float(both[0]), bool(both[1])

    def _parameters_finite_flag(self) -> torch.Tensor:
        """1.0 if every parameter is finite, else 0.0, left on the device (no sync). The max-norm of
        a tensor is finite exactly when all its entries are (unlike the 2-norm it cannot overflow)."""
        params = [p.detach() for p in self.model.parameters() if p.numel()]
        if not params:
            return torch.ones((), device=self.dist.device)
        norms = torch._foreach_norm(params, float("inf"))
        return torch.isfinite(torch.stack(norms)).all().to(torch.float32)

    def _check_health(self, step: int, loss: float, grad_norm: float, params_finite: bool,
                      last_good: Optional[int]) -> None:
        """Stop, naming what became non-finite at `step`: the loss, the gradient norm or a parameter."""
        what = None
        if not math.isfinite(loss):
            what = f"training loss became {loss}"
        elif not math.isfinite(grad_norm):
            what = f"the gradient norm became {grad_norm}"
        elif not params_finite:
            what = f"{self.non_finite_state() or 'a parameter'} became non-finite"
        if what is None:
            return
        if last_good is not None:
            where = (f"the last good checkpoint (step {last_good}) is kept at {self.checkpoints.path}; a rerun "
                     "resumes from it")
        else:
            where = "no checkpoint had been written yet"
        later = f" (read at step {self.step})" if self.step != step else ""
        raise NonFiniteLossError(f"{what} at step {step}; stopped{later}. {where}. Lower optim.*_lr or set "
                                 f"train.grad_clip, then rerun.")

    def _after_step(self, p: "_PendingStep", loss: float, grad_norm: float, validate) -> None:
        t = self.recipe.train
        lr_mul = lr_multiplier(p.step, t, p.train_time)
        rec = {"step": p.step, "loss": loss, "lr_mul": lr_mul, "train_time": p.train_time}
        self.history.append(rec)
        if self.progress is not None:
            self.progress(p.step, t.max_steps, rec)
        if p.step % t.log_every == 0 or p.step == 1 or p.step == t.max_steps:
            avg = p.train_time / p.step
            left = (t.max_steps - p.step) * avg
            if t.max_wallclock_s:
                left = min(left, max(t.max_wallclock_s - p.train_time, 0.0))
            self.log(f"step={p.step}/{t.max_steps} loss={loss:.4f} lr_mul={lr_mul:.4f} grad_norm={grad_norm:.3f} "
                     f"train_time={p.train_time:.1f}s step_avg={avg * 1000:.1f}ms "
                     f"tok_s={p.tokens_seen / max(p.train_time, 1e-9):.0f} eta={left:.0f}s")
        if validate is not None and t.val_every and p.step % t.val_every == 0:
            metrics = validate(self.ema_model() if self.ema else self.model)  # untimed
            rec.update(metrics)
            self.log(f"val step={p.step} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

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
