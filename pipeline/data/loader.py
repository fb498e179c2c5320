"""The baseline's sequential training loader (pg_mechanics §1.7), made resumable.

Every rank walks the same sorted shard list front to back, wrapping around forever; there is
no shuffling. Each `next_batch(local_tokens)` consumes one contiguous chunk of
`(local_tokens + 1) * world_size` tokens of that shared stream; rank r keeps the r-th span of
`local_tokens + 1` tokens and returns its first `local_tokens` as inputs and the same span
shifted by one as targets, both shaped [local_tokens // seq_len, seq_len]. Ranks therefore see
disjoint, adjacent spans, and sequences run across document (BOS) boundaries, as in the
baseline. The position in the stream is three integers, so a run restored from a checkpoint
continues with exactly the batches it would have seen.

Use:
    loader = SequentialLoader(list_shards(data_dir, "train"), seq_len=1024, rank=r, world_size=w)
    x, y = loader.next_batch(local_tokens)        # int64 tensors
    state = loader.state_dict(); ...; loader.load_state_dict(state)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.data.shards import check_token_ids, load_shard, read_header
from pipeline.errors import UserError


class SequentialLoader:
    def __init__(self, shard_paths: Sequence[Path], seq_len: int, rank: int = 0, world_size: int = 1,
                 local_tokens: int | None = None, vocab_size: int | None = None):
        if not shard_paths:
            raise UserError("the training loader got no shard files; run `pgolf data prepare` first.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.paths = sorted(Path(p) for p in shard_paths)
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.local_tokens = local_tokens  # the trainer's fixed micro-batch; next_batch() then needs no size
        self.vocab_size = vocab_size  # every token served is checked against it (None: not checked)
        # Header reads are cheap and catch a broken shard now rather than hours into a run.
        self.sizes = [read_header(p) for p in self.paths]
        self.total_tokens = sum(self.sizes)
        self.shard = 0
        self.pos = 0
        self.tokens_served = 0  # stream tokens consumed by all ranks together
        self._cached: tuple[int, np.ndarray] | None = None

    def _tokens(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, load_shard(self.paths[index]))
        return self._cached[1]

    def _advance(self, n: int, keep: bool) -> list[np.ndarray]:
        """Move `n` tokens along the stream, returning the pieces read if `keep`."""
        pieces = []
        while n > 0:
            avail = self.sizes[self.shard] - self.pos
            if avail <= 0:  # end of this shard (or an empty shard): next one, wrapping
                self.shard = (self.shard + 1) % len(self.paths)
                self.pos = 0
                continue
            k = min(n, avail)
            if keep:
                piece = self._tokens(self.shard)[self.pos : self.pos + k]
                check_token_ids(piece, self.vocab_size, f"{self.paths[self.shard]} (tokens {self.pos}..{self.pos + k})")
                pieces.append(piece)
            self.pos += k
            n -= k
        return pieces

    def next_batch(self, local_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = self.local_tokens if local_tokens is None else local_tokens
        if local_tokens is None:
            raise ValueError("next_batch() needs local_tokens, here or at construction")
        if local_tokens <= 0 or local_tokens % self.seq_len:
            raise UserError(
                f"tokens per rank per micro-step ({local_tokens}) must be a positive multiple of "
                f"train.seq_len ({self.seq_len}); adjust train.batch_tokens or train.seq_len."
            )
        span = local_tokens + 1
        need = span * self.world_size
        if need > self.total_tokens:
            raise UserError(
                f"the training shards ({self.paths[0].parent}) hold {self.total_tokens} tokens, fewer "
                f"than one batch needs ({need} = ({local_tokens} + 1) x {self.world_size} ranks); "
                f"lower train.batch_tokens / train.seq_len or prepare more data."
            )
        # Skip the spans of lower ranks, read ours, skip the rest: every rank ends at the same
        # stream position without reading the others' tokens.
        self._advance(span * self.rank, keep=False)
        pieces = self._advance(span, keep=True)
        self._advance(span * (self.world_size - self.rank - 1), keep=False)
        self.tokens_served += need
        local = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        x = local[:-1].reshape(-1, self.seq_len)
        y = local[1:].reshape(-1, self.seq_len)
        return x, y

    def state_dict(self) -> dict:
        return {"shard": self.shard, "pos": self.pos, "tokens_served": self.tokens_served}

    def load_state_dict(self, state: dict) -> None:
        shard, pos = int(state["shard"]), int(state["pos"])
        if not 0 <= shard < len(self.paths) or not 0 <= pos <= self.sizes[shard]:
            raise UserError(
                f"loader state (shard {shard}, position {pos}) does not fit these {len(self.paths)} "
                f"training shards; resume with the data directory the checkpoint was trained on."
            )
        self.shard, self.pos = shard, pos
        self.tokens_served = int(state["tokens_served"])
