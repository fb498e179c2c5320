"""The train stage's batches: which loader a recipe's Trainer reads (pipeline.stages.train) and how
one process with gradient accumulation reads exactly what the reference multi-GPU run reads.

    accum = grad_accum_steps(recipe, world_size)     # micro-steps per optimizer step
    loader = make_loader(recipe, shard_paths, dist_info, accum, local_tokens)
    x, y = loader.next_batch()                       # one micro-batch, int64 [B, seq_len]

Runtime-pure (bundled into the submission script).
"""

from __future__ import annotations

import importlib

from pipeline.config import Recipe
from pipeline.distributed import DistInfo
from pipeline.errors import UserError

# PR #684's loader (train.loader=coprime), imported by name so that only the scripts of recipes that
# use it carry it (pipeline.stages.train.train_modules). The sequential one is imported plainly: the
# calibration of quantization schemes reads training batches with it (pipeline.export.calibration).
COPRIME_LOADER_MODULE = "pipeline.data.coprime_loader"


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
        CoprimeShardLoader = importlib.import_module(COPRIME_LOADER_MODULE).CoprimeShardLoader
        t, world = recipe.train, dist_info.world_size
        step_seqs = t.batch_tokens // t.seq_len
        self.loaders = [CoprimeShardLoader(shard_paths, t.seq_len, step_seqs, rank=m * world + dist_info.rank,
                                           world_size=accum * world, cfg=t.coprime, device=dist_info.device,
                                           vocab_size=recipe.model.vocab_size)
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
                            local_tokens=local_tokens, vocab_size=recipe.model.vocab_size)
