"""The scorer: validation loss and bits-per-byte exactly as the challenge computes them.

`evaluate` truncates the stream (pg_mechanics.md §2.5.5), builds the windows of
`EvalConfig.mode` (see eval.windows), scores this rank's contiguous share of them in batches,
and sums nats, scored tokens and their bytes (eval.byte_tables: the table formula, or the
byte sidecar's entry at each scored position when the tables carry one, pg_mechanics.md §2.7)
in float64. With torch.distributed initialised the three sums (plus the top-1 count) go
through ONE all_reduce(SUM); per-rank bpbs are never averaged (§2.5.7). Then
    val_loss = nats / tokens          val_bpb = nats / (bytes * ln 2).

`model_fn(ids [B, T] int64) -> logits [B, T, V]` is any causal callable (an nn.Module, or a
compiled forward). It is run under torch.inference_mode, with bf16 autocast on CUDA as the
records do, and its logits are cast to float32 before the cross-entropy.

Usage:
    tables = ByteTables.from_sentencepiece(path, vocab_size)
    res = evaluate(model, val_tokens, tables, recipe.eval, device)
    print(res.val_loss, res.val_bpb, res.token_count, res.byte_count)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from eval.byte_tables import ByteTables
from eval.windows import Windows, build_windows, truncate_for_eval
from pipeline.config import EvalConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class EvalResult:
    loss_sum: float  # nats over all scored targets
    token_count: int  # scored targets
    byte_count: int  # bytes those targets stand for
    # Scored targets that were the model's argmax: a top-1 accuracy near 1 on real text means
    # the model has seen the answers (a leak), which the reports alarm on.
    top1_correct: int = 0

    @property
    def val_loss(self) -> float:
        return self.loss_sum / self.token_count if self.token_count else math.nan

    @property
    def val_bpb(self) -> float:
        return self.loss_sum / (self.byte_count * math.log(2.0)) if self.byte_count else math.nan

    @property
    def top1_accuracy(self) -> float:
        return self.top1_correct / self.token_count if self.token_count else math.nan

    def __add__(self, other: "EvalResult") -> "EvalResult":
        return EvalResult(self.loss_sum + other.loss_sum, self.token_count + other.token_count,
                          self.byte_count + other.byte_count,
                          self.top1_correct + other.top1_correct)


EMPTY_RESULT = EvalResult(0.0, 0, 0, 0)


def as_token_tensor(tokens, device) -> torch.Tensor:
    """A 1-D int64 tensor of the stream on `device` (no copy if it already is one)."""
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        # via int64 numpy: torch cannot wrap every unsigned numpy dtype (shards are uint16)
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(tokens).astype(np.int64, copy=False)))
    if t.ndim != 1:
        raise UserError(f"the token stream must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def model_autocast(device):
    """bf16 autocast on CUDA (record practice for eval and TTT); a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model_fn):
    """model.eval() for the duration, restoring the previous mode (plain callables pass)."""
    module = model_fn if isinstance(model_fn, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


def score_tokens(model_fn, tokens, tables: ByteTables, windows: Windows, device,
                 batch_seqs: int, progress=None) -> EvalResult:
    """Score `windows` of the stream on this process only (no all-reduce).

    Windows are batched `batch_seqs` at a time and right-padded to the longest window, so the
    shapes stay fixed for compiled models; padding sits after every real position of its row
    and is never scored, so a causal model's scored logits do not see it. `progress(done,
    total)` is called after each batch with counts of windows. With a byte sidecar attached
    to `tables`, `tokens` must be (a prefix of) the stream it belongs to: each scored target
    counts the sidecar's entry at its stream position.
    """
    if batch_seqs < 1:
        raise UserError(f"eval.batch_seqs must be >= 1, got {batch_seqs}")
    device = torch.device(device)
    tok = as_token_tensor(tokens, device)
    tables = tables.to(device)
    n = tok.numel()
    if tables.token_bytes is not None and n > tables.token_bytes.numel():
        tables.check_stream(n)  # raises: the sidecar is shorter than the stream
    total = len(windows)
    if total and int(windows.last_targets.max()) >= n:
        raise ValueError("a window reaches past the end of the token stream")
    pad_to = int(windows.lengths.max()) if total else 0
    offs = torch.arange(pad_to, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nats, bytes
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # tokens, top-1 hits
    with eval_mode(model_fn), torch.inference_mode():
        for lo in range(0, total, batch_seqs):
            part = windows[lo:lo + batch_seqs]
            starts = torch.from_numpy(part.starts).to(device)[:, None]
            lengths = torch.from_numpy(part.lengths).to(device)[:, None]
            first = torch.from_numpy(part.score_from).to(device)[:, None]
            real = offs[None, :] < lengths
            scored = real & (offs[None, :] >= first)
            pos = (starts + offs[None, :]).clamp_max(n - 2)  # clamp only touches padding
            ids = torch.where(real, tok[pos], 0)
            tgt = tok[pos + 1]
            with model_autocast(device):
                logits = model_fn(ids)
            if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise UserError(f"the model returned logits of shape {tuple(logits.shape)} "
                                f"for ids {tuple(ids.shape)}; expected [B, T, V]")
            # select scored rows first: sliding eval scores only stride/seq_len of positions
            sel_logits = logits[scored].float()
            sel_tgt = tgt[scored]
            # per-token CE in float32, summed in float64 (a float32 sum drifts over ~62M)
            nll = F.cross_entropy(sel_logits, sel_tgt, reduction="none").to(torch.float64).sum()
            nbytes = tables.scored_bytes((pos + 1)[scored], ids[scored], sel_tgt).sum()
            sums += torch.stack([nll, nbytes.to(torch.float64)])
            hits = (sel_logits.argmax(dim=-1) == sel_tgt).sum()
            counts += torch.stack([scored.sum(), hits])
            if progress is not None:
                progress(min(lo + batch_seqs, total), total)
    nats, nbytes = sums.tolist()
    ntok, hits = counts.tolist()
    return EvalResult(float(nats), int(ntok), int(round(nbytes)), int(hits))


def all_reduce_result(result: EvalResult, device) -> EvalResult:
    """Sum a rank's partial result over all ranks with one all_reduce (no-op when
    torch.distributed is not initialised). float64 holds counts exactly up to 2**53."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return result
    buf = torch.tensor([result.loss_sum, result.token_count, result.byte_count,
                        result.top1_correct], dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    nats, ntok, nbytes, hits = buf.tolist()
    return EvalResult(nats, int(round(ntok)), int(round(nbytes)), int(round(hits)))


def prepare_stream(tokens, tables: ByteTables, seq_len: int, device) -> torch.Tensor:
    """The truncated (§2.5.5), range-checked stream as int64 on `device`. `tokens` is the
    whole validation stream: a byte sidecar on `tables` must have one count per token of it
    (UserError otherwise), and is truncated with it by position."""
    tables.check_stream(len(tokens))
    n = truncate_for_eval(len(tokens), seq_len)
    tok = as_token_tensor(tokens[:n], device)
    tables.check_ids(tok)
    return tok


def evaluate(model_fn, tokens, tables: ByteTables, cfg: EvalConfig, device, rank: int = 0,
             world_size: int = 1, progress=None) -> EvalResult:
    """Score the whole validation stream (BOS first) under `cfg` and return global sums.

    Each rank passes the same full stream; it scores its contiguous share of the windows.
    Without torch.distributed the result is this rank's share only, so results of all ranks
    add up (EvalResult supports `+`) to the single-process result."""
    tok = prepare_stream(tokens, tables, cfg.seq_len, device)
    windows = build_windows(cfg.mode, tok.numel(), cfg.seq_len, cfg.stride, world_size)
    mine = windows.split(rank, world_size)
    local = score_tokens(model_fn, tok, tables, mine, device, cfg.batch_seqs, progress)
    return all_reduce_result(local, device)
