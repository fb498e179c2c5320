"""Byte-accounting tables that turn scored tokens into the byte count behind bits-per-byte.

The challenge scores bpb = nats / (bytes * ln 2), where the bytes are not read from the raw
text but derived token by token from three lookup tables built from the SentencePiece model
(reference: pg_mechanics.md §2.1-2.2; same rule as the challenge's `build_sentencepiece_luts`):

* `base_bytes[t]`        UTF-8 length of piece t with ONE leading "▁" stripped; byte pieces
                         `<0xNN>` are 1; control / unknown / unused pieces are 0.
* `has_leading_space[t]` the piece starts with "▁" (that marker stands for one space byte).
* `is_boundary[t]`       control / unknown / unused pieces and every slot past the SP vocab.

A scored target t with previous (input) token p stands for
    base_bytes[t] + (has_leading_space[t] and not is_boundary[p])
bytes: a "▁" right after BOS (or any boundary) is not counted (§2.5.2).

Usage:
    tables = ByteTables.from_sentencepiece("tokenizer.model", vocab_size=1024)
    nbytes = tables.target_bytes(prev_ids, tgt_ids)   # int64, same shape as the inputs
    total = tables.count_bytes(stream)                  # all (prev, target) pairs of a stream
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

SPACE_MARK = "\u2581"  # SentencePiece's visible stand-in for a space


@dataclass(frozen=True)
class ByteTables:
    base_bytes: torch.Tensor  # int16 [table_size]
    has_leading_space: torch.Tensor  # bool [table_size]
    is_boundary: torch.Tensor  # bool [table_size]

    def __post_init__(self):
        n = self.base_bytes.shape
        if (len(n) != 1 or self.has_leading_space.shape != n or self.is_boundary.shape != n):
            raise ValueError("byte tables must be three 1-D tensors of the same length")
        if (self.base_bytes.dtype != torch.int16 or self.has_leading_space.dtype != torch.bool
                or self.is_boundary.dtype != torch.bool):
            raise ValueError("byte tables must be (int16, bool, bool)")

    @property
    def size(self) -> int:
        return int(self.base_bytes.numel())

    @classmethod
    def from_sentencepiece(cls, sp_or_path, vocab_size: int = 0,
                           require_space_piece: bool = True) -> "ByteTables":
        """Build the tables from a SentencePieceProcessor or a `.model` path.

        The tables have max(sp.vocab_size(), vocab_size) slots, so a model whose embedding is
        padded past the tokenizer still indexes safely (the extra slots are boundaries).
        `require_space_piece` enforces, as the records do from 2026-04-01 (upstream issue
        #897), that a lone "▁" piece exists: without it a bare space is spelled some other way
        and the one-byte-per-"▁" accounting stops being exact.
        """
        sp = _load_processor(sp_or_path)
        sp_vocab = int(sp.vocab_size())
        size = max(sp_vocab, int(vocab_size))
        base = np.zeros(size, dtype=np.int16)
        space = np.zeros(size, dtype=np.bool_)
        boundary = np.ones(size, dtype=np.bool_)  # slots past the SP vocab stay boundaries
        for tid in range(sp_vocab):
            if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
                continue  # 0 bytes, boundary
            boundary[tid] = False
            if sp.is_byte(tid):
                base[tid] = 1  # one raw byte, whatever its value
                continue
            piece = sp.id_to_piece(tid)
            if piece.startswith(SPACE_MARK):
                space[tid] = True
                piece = piece[1:]  # only the first marker is the optional space; others are text
            base[tid] = len(piece.encode("utf-8"))
        if require_space_piece:
            sid = sp.piece_to_id(SPACE_MARK)
            if sp.is_unknown(sid) or sid >= sp_vocab:
                raise UserError(
                    "tokenizer has no lone '\u2581' piece, so byte counts of runs of spaces "
                    "would be wrong (upstream issue #897); retrain it on text with spaces, or "
                    "pass require_space_piece=False to reproduce an old record's numbers")
        return cls(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))

    def to(self, device) -> "ByteTables":
        if self.base_bytes.device == torch.device(device):
            return self
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device),
                          self.is_boundary.to(device))

    def target_bytes(self, prev_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """Bytes each target stands for, given the token before it (int64, input shape).

        No range check here: this runs per batch on the hot path, so callers validate the
        token stream once (`check_ids`)."""
        if prev_ids.shape != tgt_ids.shape:
            raise ValueError(f"prev_ids {tuple(prev_ids.shape)} and tgt_ids "
                             f"{tuple(tgt_ids.shape)} must have the same shape")
        extra = self.has_leading_space[tgt_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[tgt_ids].to(torch.int64) + extra.to(torch.int64)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise a UserError if any token id falls outside the tables."""
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.size:
            raise UserError(
                f"token ids span [{lo}, {hi}] but the byte tables have {self.size} slots: the "
                "tokens were made with a different tokenizer than the one given")

    def count_bytes(self, token_stream) -> int:
        """Total bytes of every (previous, target) pair of a 1-D stream (its first token is
        context only, as BOS is in the validation stream)."""
        ids = torch.as_tensor(np.asarray(token_stream, dtype=np.int64)).to(self.base_bytes.device)
        if ids.ndim != 1:
            raise ValueError("count_bytes expects a 1-D token stream")
        self.check_ids(ids)
        if ids.numel() < 2:
            return 0
        return int(self.target_bytes(ids[:-1], ids[1:]).sum())


def _load_processor(sp_or_path):
    if isinstance(sp_or_path, (str, Path)):
        import sentencepiece as spm

        path = Path(sp_or_path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        try:
            return spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"cannot load tokenizer model {path}: {exc}") from exc
    for attr in ("vocab_size", "id_to_piece", "is_byte", "is_control"):
        if not hasattr(sp_or_path, attr):
            raise UserError(f"expected a SentencePieceProcessor or a .model path, got "
                            f"{type(sp_or_path).__name__}")
    return sp_or_path
