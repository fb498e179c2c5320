"""Evaluation windows: which slice of the validation stream each forward pass sees, and
which of its targets it scores.

Conventions. The stream has N tokens (BOS first); its targets are the stream positions
1..N-1 (position 0 is context only). A `Window(start, length, score_from)` feeds the model
tokens[start : start+length] and predicts tokens[start+1 : start+length+1]; it scores the
positions k in [score_from, length) of the window, i.e. the stream targets
start+1+score_from .. start+length (inclusive), each seeing the (k+1) tokens
tokens[start .. start+k] and nothing at or after its own position.

Modes (`build_windows`):
* `nonoverlap_windows` - baseline `eval_val`: back-to-back windows of seq_len, all scored.
* `sliding_windows`    - pg_mechanics.md §4.4.1 with the FIXED tail rule: every target scored
                         exactly once, each with >= seq_len - stride tokens before it.
* `pr298_windows`      - PR #298's "sliding" eval (seed_prs.md §2.3), which scores EVERY
                         position of overlapping windows: tokens count many times. Kept only to
                         reproduce that PR's number.

Usage:
    n = truncate_for_eval(len(tokens), seq_len)
    wins = sliding_windows(n, seq_len, stride)
    mine = wins.split(rank, world_size)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from pipeline.errors import UserError


class Window(NamedTuple):
    start: int
    length: int
    score_from: int

    @property
    def first_target(self) -> int:
        """Stream position of the first scored target."""
        return self.start + 1 + self.score_from

    @property
    def last_target(self) -> int:
        """Stream position of the last scored target (inclusive)."""
        return self.start + self.length


@dataclass(frozen=True)
class Windows:
    """A list of windows stored as three int64 arrays (a full FineWeb sliding eval has ~1M
    windows, which would be ~100 MB as Python tuples)."""

    starts: np.ndarray
    lengths: np.ndarray
    score_from: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Windows(self.starts[i], self.lengths[i], self.score_from[i])
        return Window(int(self.starts[i]), int(self.lengths[i]), int(self.score_from[i]))

    def __iter__(self) -> Iterator[Window]:
        return (self[i] for i in range(len(self)))

    @property
    def num_scored(self) -> int:
        return int((self.lengths - self.score_from).sum())

    @property
    def first_targets(self) -> np.ndarray:
        return self.starts + 1 + self.score_from

    @property
    def last_targets(self) -> np.ndarray:
        return self.starts + self.lengths

    def split(self, rank: int, world_size: int) -> "Windows":
        """This rank's contiguous share (the baseline's floor(W*r/R) split)."""
        lo, hi = contiguous_share(len(self), rank, world_size)
        return self[lo:hi]


def contiguous_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def truncate_for_eval(n_tokens: int, seq_len: int) -> int:
    """Tokens kept for evaluation: ((n-1) // seq_len) * seq_len + 1 (§2.5.5), so the targets
    are a whole number of sequences, as the challenge's `load_validation_tokens` does."""
    _check_seq_len(seq_len)
    if n_tokens < seq_len + 1:
        raise UserError(f"the validation stream has {n_tokens} tokens, fewer than "
                        f"eval.seq_len + 1 = {seq_len + 1}; lower eval.seq_len or add data")
    return ((n_tokens - 1) // seq_len) * seq_len + 1


def nonoverlap_windows(n: int, seq_len: int) -> Windows:
    """Back-to-back windows of seq_len targets, every target scored (the first target of
    each window has only one token of context). A short last window covers any remainder."""
    _check_seq_len(seq_len)
    total = _num_targets(n)
    starts = np.arange(0, total, seq_len, dtype=np.int64)
    lengths = np.minimum(starts + seq_len, total) - starts
    return Windows(starts, lengths, np.zeros_like(starts))


def sliding_windows(n: int, seq_len: int, stride: int) -> Windows:
    """Stride-`stride` windows; each target scored exactly once (fixed tail rule, §4.4.1).

    Window starts are multiples of `stride`. The first window scores all its targets; every
    other scores only targets from offset seq_len - stride on, i.e. its last `stride` (fewer
    for the final, shorter window), so each has >= seq_len - stride tokens of context. A start
    is kept only if that scored range is non-empty (ws + seq_len - stride < N - 1), which is
    what stops the original code's short tail windows from re-scoring covered targets.
    """
    _check_seq_len(seq_len)
    if not 1 <= stride <= seq_len:
        raise UserError(f"eval.stride must be in [1, eval.seq_len={seq_len}], got {stride}")
    total = _num_targets(n)
    context = seq_len - stride
    starts = np.arange(0, total, stride, dtype=np.int64)
    starts = starts[(starts == 0) | (starts + context < total)]
    lengths = np.minimum(starts + seq_len, total) - starts
    score_from = np.where(starts == 0, 0, context).astype(np.int64)
    return Windows(starts, lengths, score_from)


def pr298_windows(n: int, seq_len: int, stride: int, world_size: int = 1) -> Windows:
    """PR #298's overlapping "sliding" eval, which scores every position of every window.

    What the PR does (its `eval_val`, read at refs/pull/298/head): the (N-1)//seq_len whole
    sequences are split contiguously over `world_size` ranks; inside each rank's slice of
    S*seq_len + 1 tokens, a full window of seq_len starts at every multiple of `stride` while
    start + seq_len < S*seq_len + 1 (so windows never cross a rank's slice and never run
    short); all seq_len targets of each window are scored, bytes counted the same way.
    Each token is therefore scored about seq_len/stride times, at every context length from 1
    up to seq_len: an average over context lengths, not sliding-window scoring. The window set
    depends on world_size, hence the argument.
    """
    _check_seq_len(seq_len)
    if stride < 1:
        raise UserError(f"eval.stride must be >= 1, got {stride}")
    total_seqs = _num_targets(n) // seq_len
    parts = []
    for r in range(world_size):
        s0, s1 = contiguous_share(total_seqs, r, world_size)
        if s1 - s0 < 1:
            continue
        # start + seq_len < S*seq_len + 1  <=>  start <= (S - 1) * seq_len
        parts.append(s0 * seq_len + np.arange(0, (s1 - s0 - 1) * seq_len + 1, stride,
                                              dtype=np.int64))
    starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return Windows(starts, np.full_like(starts, seq_len), np.zeros_like(starts))


def build_windows(mode: str, n: int, seq_len: int, stride: int, world_size: int = 1) -> Windows:
    """The windows of an `EvalConfig.mode`."""
    if mode == "sliding":
        return sliding_windows(n, seq_len, stride)
    if mode == "nonoverlap":
        return nonoverlap_windows(n, seq_len)
    if mode == "pr298_all_positions":
        return pr298_windows(n, seq_len, stride, world_size)
    raise UserError(f"eval.mode must be sliding, nonoverlap or pr298_all_positions, got {mode!r}")


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise UserError(f"eval.seq_len must be >= 1, got {seq_len}")


def _num_targets(n: int) -> int:
    if n < 2:
        raise UserError(f"a token stream of {n} tokens has no targets to score")
    return n - 1
