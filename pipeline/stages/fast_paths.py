"""The training fast paths one run uses (pipeline.stages.train.Trainer), resolved for its device from
the recipe: train.compile / autocast / attention_kernel / host_sync_every / cpu_workers,
train.coprime.copy_stream and optim.muon_compile. "auto" is the CUDA fast path on CUDA and the plain
path on the CPU, whose numbers it leaves bitwise unchanged; a combination that cannot run is a
UserError before anything is built, never a silent fallback.

    fast = resolve_fast_paths(recipe, device, world_size, passes_per_step)   # FastPaths
    with sdpa_kernel_context(fast.attention_kernel): ...                    # one SDPA kernel
    norm = clip_grad_norm_on_device(params, max_norm, device)               # no host sync
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pipeline.config import Recipe
from pipeline.errors import UserError


@dataclass(frozen=True)
class FastPaths:
    """The fast paths one run uses, resolved from the recipe for its device (TrainConfig's
    autocast ... cpu_workers, optim.muon_compile, train.coprime.copy_stream)."""

    compile: bool
    autocast: Optional[torch.dtype]  # None = full precision
    attention_kernel: str  # "auto" = PyTorch's choice
    sync_every: int  # steps between host reads of the loss and health flags
    cpu_workers: int
    muon_compile: bool
    copy_stream: bool

    def describe(self) -> str:
        onoff = {True: "on", False: "off"}
        return (f"compile={onoff[self.compile]} autocast={'bf16' if self.autocast is not None else 'off'} "
                f"attention_kernel={self.attention_kernel} host_sync_every={self.sync_every} "
                f"cpu_workers={self.cpu_workers} muon_compile={onoff[self.muon_compile]} "
                f"copy_stream={onoff[self.copy_stream]}")


def resolve_fast_paths(recipe: Recipe, device, world_size: int, passes_per_step: int) -> FastPaths:
    """"auto" -> on with CUDA, off elsewhere; a combination that cannot run is a UserError here,
    before anything is built, never a silent fallback."""
    t, cuda = recipe.train, torch.device(device).type == "cuda"

    def on(choice: str) -> bool:
        return choice == "on" or (choice == "auto" and cuda)

    autocast = torch.bfloat16 if t.autocast == "bf16" or (t.autocast == "auto" and cuda) else None
    kernel = t.attention_kernel
    if kernel in ("efficient", "cudnn") and not cuda:
        raise UserError(f"train.attention_kernel={kernel} is a CUDA kernel; on the CPU use auto, flash or math.")
    if kernel == "flash" and cuda and autocast is None:
        raise UserError("train.attention_kernel=flash needs bf16 inputs on CUDA; set train.autocast to auto or bf16 "
                        "(or pick train.attention_kernel=auto/math for full precision).")
    copy_stream = t.loader == "coprime" and on(t.coprime.copy_stream)
    if t.loader == "coprime" and t.coprime.copy_stream == "on" and not cuda:
        raise UserError("train.coprime.copy_stream=on needs a CUDA device; use auto or off.")
    compile_model = on(t.compile)
    workers = t.cpu_workers
    if workers > 1:
        why = None
        if cuda:
            why = "it shares passes among CPU threads; on CUDA leave it at 1"
        elif world_size > 1:
            why = "it shares one process's passes; run one process"
        elif compile_model:
            why = "torch.compile'd code is not run from several threads here; set train.compile=off"
        elif passes_per_step < workers:
            why = (f"a step has {passes_per_step} pass(es) to share; raise train.reference_world_size or set "
                   f"train.micro_batch_seqs")
        if why:
            raise UserError(f"train.cpu_workers={workers} cannot be used here: {why}.")
    sync_every = t.host_sync_every or (t.log_every if cuda else 1)
    return FastPaths(compile_model, autocast, kernel, sync_every, workers, on(recipe.optim.muon_compile), copy_stream)


def sdpa_kernel_context(name: str):
    """A context restricting scaled_dot_product_attention to one kernel (train.attention_kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


def clip_grad_norm_on_device(params, max_norm: float, device) -> torch.Tensor:
    """grad_transforms.clip_grad_norm's global norm and clip, the norm left on the device (no sync)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=device)
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if max_norm > 0:
        # torch scales by min(1, max_norm / (total + 1e-6)): only ever down, never by 1/0.
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total
