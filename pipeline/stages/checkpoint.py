"""Training checkpoints and Ctrl-C/SIGTERM handling for `pgolf run` (pipeline.stages.train.Trainer).

    ckpt = Checkpointer(out_dir, key, log)   # Trainer builds one when given a checkpoint folder
    ckpt.resume(trainer) -> step or None;  ckpt.save(trainer) -> wrote?;  restore = ckpt.catch_signals(trainer)

`ckpt.pt` holds the model, optimizers, EMA, grad-conditioning state, step, loader position, RNG
states, elapsed training time, the history and the key it was written under; with several ranks
each rank also writes its own optimizer state (`optim_rank{r}.pt`: Muon keeps each matrix's
momentum on the rank that owns it). A checkpoint is resumed only under the same key (training
config, and for pgolf run the training data's and the code's hashes); one written under another
key is moved aside as `ckpt.stale.pt`. A signal only sets the trainer's stop flag: the loop stops
at the next step boundary, so the saved state is never taken mid-step.

The shipped train_gpt.py neither checkpoints nor resumes: the Trainer imports this module by name
only when it has a folder, so pipeline.codegen's import scan leaves it out of the script.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.errors import UserError
from pipeline.fileio import atomic_torch_save
from pipeline.stages.train import CHECKPOINT


class Checkpointer:
    """`out_dir`: the checkpoint folder (created); `key`: what a checkpoint must have been written
    under to be resumed."""

    def __init__(self, out_dir: Path, key: dict, log: Callable[[str], None]):
        self.out_dir, self.key, self.log = Path(out_dir), key, log
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / CHECKPOINT

    def _rank_optim_path(self, rank: int) -> Path:
        return self.out_dir / f"optim_rank{rank}.pt"

    def _state(self, tr) -> dict:
        return {"step": tr.step, "train_time": tr.train_time, "tokens_seen": tr.tokens_seen,
                "world_size": tr.dist.world_size, **tr.training_state(), "history": tr.history,
                "checkpoint_key": self.key}

    def save(self, tr) -> bool:
        """Write the trainer's state. Refuses a non-finite state, so whatever checkpoint exists is a
        good one; returns whether it wrote."""
        bad = tr.non_finite_state()
        if bad:
            self.log(f"checkpoint not written: {bad} is not finite; the previous checkpoint is kept")
            return False
        if tr.dist.world_size > 1:
            atomic_torch_save({"step": tr.step, "optimizers": [o.state_dict() for o in tr.optimizers]},
                         self._rank_optim_path(tr.dist.rank))
        if tr.dist.is_main:
            atomic_torch_save(self._state(tr), self.path)
        return True

    def resume(self, tr) -> Optional[int]:
        """Load the checkpoint into `tr` when there is one written under this key; returns its step,
        or None (no checkpoint, or a stale one, now moved aside). Raises UserError for a checkpoint
        of another world size or a rank's optimizer state from another step."""
        path = self.path
        if not path.exists():
            return None
        state = torch.load(path, map_location=tr.dist.device, weights_only=False)
        written_under = state.get("checkpoint_key") or {}
        if written_under != self.key:
            # Never resume what another config, other data or other code produced; keep it aside.
            changed = sorted(k for k in set(written_under) | set(self.key) if written_under.get(k) != self.key.get(k))
            stale = path.with_name("ckpt.stale.pt")
            os.replace(path, stale)
            self.log(f"checkpoint {path} was written for a different {'/'.join(changed) or 'run'}; starting fresh "
                     f"(old checkpoint kept as {stale.name})")
            return None
        world = tr.dist.world_size
        if state.get("world_size", 1) != world:
            raise UserError(f"{path} was written by {state.get('world_size', 1)} processes; resume with the same "
                            f"number (now {world}), or delete {self.out_dir} to start over.")
        optim_states = state["optimizers"]
        if world > 1:
            mine_path = self._rank_optim_path(tr.dist.rank)
            mine = torch.load(mine_path, map_location=tr.dist.device, weights_only=False)
            if mine["step"] != state["step"]:
                raise UserError(f"{mine_path} is from step {mine['step']}, the checkpoint from step "
                                f"{state['step']}; delete {self.out_dir} to start over.")
            optim_states = mine["optimizers"]
        tr.load_training_state(state | {"optimizers": optim_states})
        tr.step, tr.train_time, tr.tokens_seen = state["step"], state["train_time"], state["tokens_seen"]
        tr.history = state["history"]
        self.log(f"resume step={tr.step} train_time={tr.train_time:.1f}s from={path}")
        return tr.step

    def catch_signals(self, tr) -> Callable[[], None]:
        """SIGINT/SIGTERM set `tr.stop_signal`, which the loop reads at the next step boundary; a
        second signal interrupts at once. Returns a function restoring the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # handlers can only be installed from the main thread
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if tr.stop_signal is not None:
                raise KeyboardInterrupt
            tr.stop_signal = signum
            self.log(f"signal {signal.Signals(signum).name}: stopping after step {tr.step + 1} "
                     "(send it again to stop at once)")

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
