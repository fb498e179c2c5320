"""Test-time training (TTT) drivers and the score-before-update checker.

`score_first_ttt` is the legal procedure of PR #549 (after PR #461; pg_mechanics.md §4.5.2):
the sliding windows are grouped into chunks of `ttt.chunk_tokens` targets (a window belongs
to the chunk holding its first scored target); for each chunk in order, its windows are
SCORED first (eval mode, inference mode), and only then, except for the last chunk, the model
trains on that chunk's tokens. Every token is scored once, before any update has seen it
(issue #1017's conditions 3 and 4). Weights and optimizer state carry over between chunks.

`pre_score_full_val_ttt` reproduces PR #684's published procedure, which is NOT legal (see its
docstring). It exists only so that PR's number can be reproduced and labelled.

Both drivers mutate `model` in place (pass a copy to keep the original) and train with plain
cross-entropy on `model(ids)` logits, the quantity that is scored. Both count bytes through
`eval.scorer.score_tokens`, so a byte sidecar attached to `tables` (pg_mechanics.md §2.7) is
what every scored target counts, in every eval mode. If `events` is a list they
append ("score", chunk, first_target, last_target) and ("update", chunk_or_epoch, first_token,
last_token) records (stream positions, inclusive; ranges are global over ranks), and
`check_score_before_update(events)` lists every violation of score-before-update.

Usage:
    events = []
    res = score_first_ttt(model, val_tokens, tables, recipe.eval, recipe.ttt, device,
                          events=events)
    assert not check_score_before_update(events)
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_left, bisect_right
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from eval.byte_tables import ByteTables
from eval.scorer import (EMPTY_RESULT, EvalResult, all_reduce_result, evaluate,
                         model_autocast, prepare_stream, score_tokens)
from eval.windows import contiguous_share, nonoverlap_windows, sliding_windows
from pipeline.config import EvalConfig, TTTConfig
from pipeline.errors import UserError


def chunk_lr(chunk: int, num_chunks: int, lr: float, min_lr: float) -> float:
    """PR #549's per-chunk cosine: min_lr + (lr - min_lr) * (1 + cos(pi * c / (C - 1))) / 2."""
    frac = chunk / max(num_chunks - 1, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def pr684_lr(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float,
             min_lr: float) -> float:
    """PR #684's TTT learning rate at optimizer step `step` (0-based, as its LambdaLR):
    linear warm-up max(0.1, step / warmup_steps) over warmup_epochs epochs, then a cosine from
    lr down to min_lr over the remaining steps."""
    total = steps_per_epoch * epochs
    warmup = steps_per_epoch * warmup_epochs
    if step < warmup:
        return lr * max(0.1, step / warmup)
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_score_before_update(events, context=()) -> list[str]:
    """Every violation of score-first ordering in an event log ([] = compliant).

    An update may only touch stream positions already scored as targets by an earlier
    "score" event (position 0, the leading BOS, is never a target and is always allowed as
    context). A "score" event that re-scores an already scored position is also reported
    (each token is scored once, in one left-to-right pass).

    `context`: further stream positions an update may read before they are scored. Per-document
    TTT (eval.ttt_lora) passes the documents' opening BOS tokens: a document's window starts at its
    BOS, which is also the previous document's last target ("end of document", §2.5.1). Its value
    is fixed by construction (the documents are found by it, as in the records), and the model
    never sees stream positions, so reading it as the first input of the next document says
    nothing about an unscored target.

    The scored positions live in an `IntervalSet` (bisection), so a per-document log of ~10^6
    events with tens of thousands of disjoint intervals checks in seconds."""
    scored = IntervalSet()
    allowed = {int(p) for p in context}
    problems = []
    for kind, tag, lo, hi in events:
        if kind == "score":
            if scored.overlaps(lo, hi):
                problems.append(f"score {tag}: positions {lo}..{hi} include already scored ones")
            scored.add(lo, hi)
        elif kind == "update":
            gap = scored.first_uncovered(max(lo, 1), hi)
            while gap is not None and gap in allowed:
                gap = scored.first_uncovered(gap + 1, hi)
            if gap is not None:
                problems.append(f"update {tag}: trains on positions {lo}..{hi}, but position "
                                f"{gap} was not scored before it")
        else:
            raise ValueError(f"unknown event kind {kind!r}")
    return problems


def score_first_ttt(model, tokens, tables: ByteTables, eval_cfg: EvalConfig, ttt_cfg: TTTConfig,
                    device, rank: int = 0, world_size: int = 1, progress=None,
                    events=None, micro_seqs: Optional[int] = None) -> EvalResult:
    """Legal score-first chunked TTT (PR #549). Returns the global EvalResult of the scores
    committed chunk by chunk; `progress(done_chunks, num_chunks)`. `micro_seqs`: the most
    sequences one forward/backward pass holds (default: ttt.batch_seqs); it bounds memory and
    does not change the steps."""
    micro_seqs = micro_seqs or ttt_cfg.batch_seqs
    _check_world(world_size)
    if eval_cfg.mode == "pr298_all_positions":
        raise UserError("score-first TTT needs each token scored once; eval.mode "
                        "pr298_all_positions re-scores tokens. Use sliding or nonoverlap")
    seq_len, chunk = eval_cfg.seq_len, ttt_cfg.chunk_tokens
    if chunk < seq_len:
        raise UserError(f"ttt.chunk_tokens ({chunk}) must be >= eval.seq_len ({seq_len}): "
                        "TTT trains on whole sequences cut from each chunk")
    tok = prepare_stream(tokens, tables, seq_len, device)
    tables = tables.to(device)  # once, not per chunk: a byte sidecar is as long as the stream
    total = tok.numel() - 1  # targets
    if eval_cfg.mode == "sliding":
        windows = sliding_windows(tok.numel(), seq_len, eval_cfg.stride)
    else:
        windows = nonoverlap_windows(tok.numel(), seq_len)
    num_chunks = -(-total // chunk)
    # Windows are sorted by first target, so chunk ids are non-decreasing: each chunk's
    # windows are one contiguous slice of the list.
    chunk_of = np.minimum((windows.first_targets - 1) // chunk, num_chunks - 1)
    bounds = np.searchsorted(chunk_of, np.arange(num_chunks + 1), side="left")

    params, restore = _trainable(model, ttt_cfg.freeze_blocks)
    opt = _make_optimizer(params, ttt_cfg)
    result = EMPTY_RESULT
    try:
        for c in range(num_chunks):
            cw = windows[bounds[c]:bounds[c + 1]]
            # Score first: the scores of chunk c are committed before any update sees it.
            result = result + score_tokens(model, tok, tables, cw.split(rank, world_size),
                                           device, eval_cfg.batch_seqs)
            if events is not None and len(cw):
                events.append(("score", c, int(cw.first_targets[0]), int(cw.last_targets[-1])))
            # Train on the chunk just scored. Only the last chunk can lack windows of its own
            # (chunk_tokens >= seq_len >= stride), and the last chunk is never trained on.
            nseq = (min((c + 1) * chunk, total) - c * chunk) // seq_len
            if c < num_chunks - 1 and ttt_cfg.epochs > 0 and nseq > 0:
                lr = chunk_lr(c, num_chunks, ttt_cfg.lr, ttt_cfg.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                first = c * chunk  # stream position of the chunk's first input token
                for _ in range(ttt_cfg.epochs):
                    _train_pass(model, params, opt, tok, first, nseq, seq_len, ttt_cfg,
                                rank, world_size, micro_seqs, lr_at=None)
                if events is not None:
                    events.append(("update", c, first, first + nseq * seq_len))
            if progress is not None:
                progress(c + 1, num_chunks)
    finally:
        restore()
        model.eval()
    return all_reduce_result(result, device)


def pre_score_full_val_ttt(model, tokens, tables: ByteTables, eval_cfg: EvalConfig,
                           ttt_cfg: TTTConfig, device, rank: int = 0, world_size: int = 1,
                           progress=None, events=None, micro_seqs: Optional[int] = None) -> EvalResult:
    """NON-COMPLIANT. PR #684's train-then-score TTT, reproduced only to check its number.

    !!! This TRAINS ON THE VALIDATION TOKENS BEFORE SCORING THEM: `ttt.epochs` passes of
    AdamW over the whole validation stream, then `evaluate`. It breaks the challenge rule
    (only already-scored tokens may be trained on; issues #402/#677/#1017, ruling #568) and
    mostly measures memorisation of the validation set. Callers MUST mark the result
    non-compliant (ttt_compliant = false); `submit` refuses it. It also emits a
    RuntimeWarning saying so. !!!

    Procedure (seed_prs.md §3.5, PR #684's `ttt_adapt`): each epoch walks the (N-1)//seq_len
    whole sequences of the truncated stream in steps of `ttt.batch_seqs` sequences (a global
    count: #684 ran 32 per rank on 8 GPUs, i.e. ttt.batch_seqs=256 here); AdamW (betas ttt.beta1/beta2, weight decay
    ttt.weight_decay), learning rate `pr684_lr` per step, gradient-norm clip ttt.grad_clip,
    gradients averaged over ranks. `progress(done_steps, total_steps)` during training.
    """
    _check_world(world_size)
    micro_seqs = micro_seqs or ttt_cfg.batch_seqs
    warnings.warn("pre_score_full_val TTT trains on validation tokens before scoring them "
                  "(PR #684): the result is NOT compliant", RuntimeWarning, stacklevel=2)
    seq_len = eval_cfg.seq_len
    tok = prepare_stream(tokens, tables, seq_len, device)
    total_seqs = (tok.numel() - 1) // seq_len
    params, restore = _trainable(model, ttt_cfg.freeze_blocks)
    opt = torch.optim.AdamW(params, lr=ttt_cfg.lr, betas=(ttt_cfg.beta1, ttt_cfg.beta2),
                            weight_decay=ttt_cfg.weight_decay)
    steps_per_epoch = _steps_per_epoch(total_seqs, ttt_cfg.batch_seqs)
    total_steps = steps_per_epoch * ttt_cfg.epochs

    def lr_at(step):
        return pr684_lr(step, steps_per_epoch, ttt_cfg.epochs, ttt_cfg.warmup_epochs,
                        ttt_cfg.lr, ttt_cfg.min_lr)

    try:
        for epoch in range(ttt_cfg.epochs):
            _train_pass(model, params, opt, tok, 0, total_seqs, seq_len, ttt_cfg, rank,
                        world_size, micro_seqs, lr_at=lr_at, step0=epoch * steps_per_epoch)
            if events is not None:
                events.append(("update", epoch, 0, total_seqs * seq_len))
            if progress is not None:
                progress((epoch + 1) * steps_per_epoch, total_steps)
    finally:
        restore()
        model.eval()
    # the whole stream again (evaluate truncates it the same way), so a byte sidecar, which
    # has one count per token of the whole stream, still lines up
    result = evaluate(model, tokens, tables, eval_cfg, device, rank, world_size)
    if events is not None:
        events.append(("score", 0, 1, tok.numel() - 1))
    return result


# --------------------------------------------------------------------------------------
# training internals


def _steps_per_epoch(nseq: int, batch_seqs: int) -> int:
    """Optimizer steps per pass over `nseq` sequences: one per `batch_seqs` of them, whatever the
    number of processes (so one process and K processes take the same steps)."""
    if batch_seqs < 1:
        raise UserError(f"ttt.batch_seqs must be >= 1, got {batch_seqs}")
    return max(1, -(-nseq // batch_seqs))


def _train_pass(model, params, opt, tok, first, nseq, seq_len, cfg: TTTConfig, rank,
                world_size, micro_seqs: int, lr_at=None, step0=0):
    """One epoch over sequences [first + i*seq_len, first + (i+1)*seq_len] (inputs and the
    shifted targets), i < nseq. Optimizer step k trains on sequences [k*B, (k+1)*B) of the pass
    (B = ttt.batch_seqs, a global count), each rank taking its contiguous share of them in passes
    of at most `micro_seqs`; the gradient is the mean loss gradient over all the step's
    sequences, so the trajectory does not depend on the number of processes (up to the order of
    float sums). `lr_at(step)` sets a per-step learning rate (global step = step0 + k)."""
    batch = cfg.batch_seqs
    model.train()
    offs = torch.arange(seq_len + 1, device=tok.device)
    for k in range(_steps_per_epoch(nseq, batch)):
        g0, g1 = k * batch, min((k + 1) * batch, nseq)
        s0, s1 = contiguous_share(g1 - g0, rank, world_size)
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step0 + k)
        opt.zero_grad(set_to_none=True)
        for lo in range(g0 + s0, g0 + s1, micro_seqs):
            hi = min(lo + micro_seqs, g0 + s1)
            starts = first + torch.arange(lo, hi, device=tok.device) * seq_len
            seqs = tok[starts[:, None] + offs[None, :]]
            with model_autocast(tok.device):
                logits = model(seqs[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                   seqs[:, 1:].reshape(-1))
            # this part's share of the step's mean (exactly 1.0 for a one-part step)
            (loss * ((hi - lo) / (g1 - g0))).backward()
        if world_size > 1:
            _sum_grads(params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()


def _sum_grads(params):
    """Sum each rank's (already share-weighted) gradient: the mean over every sequence of the
    step on all ranks, even with uneven or empty shares. PR #549/#684 average per-rank means
    unweighted, equal whenever the shares are equal."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)


def _trainable(model, freeze_blocks: int):
    """Parameters to adapt (all but those of the first `freeze_blocks` blocks, PR #461) and a
    function that restores every requires_grad flag as it was."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    frozen = set()
    if freeze_blocks > 0:
        blocks = getattr(model, "blocks", None)
        if blocks is None or freeze_blocks > len(blocks):
            have = "no .blocks" if blocks is None else f"{len(blocks)} blocks"
            raise UserError(f"ttt.freeze_blocks={freeze_blocks} but the model has {have}")
        for block in list(blocks)[:freeze_blocks]:
            frozen.update(id(p) for p in block.parameters())
    params = []
    for p in model.parameters():
        keep = id(p) not in frozen
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if not params:
        raise UserError("ttt.freeze_blocks leaves no parameter to train")

    def restore():
        for p, flag in saved:
            p.requires_grad_(flag)

    return params, restore


def _make_optimizer(params, cfg: TTTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay)
    raise UserError(f"ttt.optimizer must be sgd or adamw, got {cfg.optimizer!r}")


def _check_world(world_size: int) -> None:
    dist = torch.distributed
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise UserError(f"TTT with world_size={world_size} needs torch.distributed initialised "
                        "(launch with torchrun), or every rank would adapt differently")


# --------------------------------------------------------------------------------------
# the checker's scored positions


class IntervalSet:
    """Disjoint, non-adjacent inclusive integer intervals, sorted (two parallel lists)."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, lo: int, hi: int) -> bool:
        # the only candidate is the last interval starting at or before hi (ends increase too)
        i = bisect_right(self.starts, hi) - 1
        return i >= 0 and self.ends[i] >= lo

    def first_uncovered(self, lo: int, hi: int):
        """Smallest position in [lo, hi] outside every interval, or None."""
        i = bisect_right(self.starts, lo) - 1
        pos = self.ends[i] + 1 if i >= 0 and self.ends[i] >= lo else lo  # merged: a gap follows
        return pos if pos <= hi else None

    def add(self, lo: int, hi: int) -> None:
        j0 = bisect_left(self.ends, lo - 1)  # first interval touching or after lo
        j1 = bisect_right(self.starts, hi + 1)  # past the last one touching hi
        if j0 < j1:
            lo, hi = min(lo, self.starts[j0]), max(hi, self.ends[j1 - 1])
        self.starts[j0:j1] = [lo]
        self.ends[j0:j1] = [hi]
