"""Phased, score-first, per-document LoRA TTT (`ttt.mode: phased_lora`; pg_mechanics.md §4.5.3-4.5.4).

The final metric of the records from R/2026-04-10_VarLenAttn on (procedure read in
R/2026-04-14_MultiPhaseGlobalSGD_PhasedTTT/train_gpt.py, `eval_val_ttt_phased`,
`train_val_ttt_global_sgd_distributed`, `_find_docs`, `_compute_chunk_window`; our own code):

1. Documents come from BOS: document d is its BOS at stream position s_d and its targets
   s_d+1 .. s_d+n_d, the last being the next document's BOS ("end of document", §2.5.1), so the
   documents' targets tile the (truncated, §2.5.5) stream: each target belongs to one document.
2. Documents are queued longest first (ties by position) and scored in batches of
   `ttt.lora_batch_docs`. Each document gets its own fresh LoRA state (eval.lora_adapters: A = a
   shared start, B = 0, a new AdamW) and is cut into chunks of `ttt.lora_chunk_tokens` targets.
   Chunk c is scored inside a window of at most `eval.seq_len` tokens of the SAME document ending
   at the chunk (document-isolated, §4.4.2); then, unless it is the document's last chunk,
   `ttt.lora_steps` AdamW steps on the mean loss of that chunk's targets (just scored) update the
   document's adapter. The state is discarded with the batch: nothing carries to another document.
3. Phases (§4.5.4): with `ttt.phase_prefix_docs` = K and `ttt.phases` = P, after the first
   K*(p+1)//P queued documents are scored, the base weights take full-parameter SGD on exactly those
   documents (all of them, every phase: cumulative), then scoring resumes with the new weights. The
   SGD uses the score-first fields (`ttt.optimizer`, `lr`, `min_lr` as a cosine over the phase's
   steps, `momentum`, `weight_decay`, `grad_clip`, `freeze_blocks`, `epochs` steps per group);
   a step takes consecutive rows (documents cut into pieces of <= eval.seq_len targets, so no row
   crosses a document: the records' GLOBAL_TTT_RESPECT_DOC_BOUNDARIES) holding at most
   `ttt.chunk_tokens` targets, the records' 32,768-token step.

Why it is legal (issue #1017, §4.5.1): every target is scored once, by its own document, and every
update - a LoRA step or a phase - trains only on positions already scored: a LoRA step reads its
document's window up to the chunk just scored; a phase reads documents whose every target was
scored before it started (on all ranks: the phase's first gradient all-reduce waits for them).
One read is exempt, as the records do it: a document's window (and a phase's row) starts with the
document's own BOS, which is also the previous document's last target; documents are processed
longest first, so that target may be scored later. Its value is fixed by construction (the
documents are found by it) and the model never sees stream positions, so this tells nothing about
an unscored target; the checker allows exactly these positions (its `context=`). The event log
(`events`, checked by `eval.ttt.check_score_before_update` with that exemption) records each score
and update as it happens, and the `IsolationLedger` proves each document's adapter was fresh when it started and
used by no other.

Processes. The queue, the batches and the phase boundaries do not depend on the number of
processes: batch g of the queue goes to rank g % world_size; a batch never straddles a phase
boundary; a document's scores depend only on its own tokens and the base weights (the adapters are
per row, AdamW is element-wise, no clipping couples rows); the phase SGD splits each step's rows
over the ranks and sums share-weighted gradients. One process and K processes give the same
result up to float rounding. Unlike the records, whose ranks pull batches from a shared counter and
pause for a phase whenever they notice it, the documents scored before each phase are exactly the
first K*(p+1)//P, on any number of processes.

    res = phased_lora_ttt(model, val_tokens, tables, recipe.eval, recipe.ttt, device, events=events)
    res.result (EvalResult), res.isolation (problems), res.ledger, res.documents
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from eval.byte_tables import ByteTables
from eval.lora_adapters import BatchedLoRA
from eval.scorer import EvalResult, all_reduce_result, model_autocast, prepare_stream
from eval.ttt import _check_world, _make_optimizer, _sum_grads, _trainable, chunk_lr
from eval.ttt import check_score_before_update
from eval.ttt_ledger import IsolationLedger
from eval.windows import contiguous_share
from pipeline.config import EvalConfig, TTTConfig
from pipeline.errors import UserError

BOS_ID = 1  # the shard format's ids: pad 0, bos 1, eos 2, unk 3 (pg_mechanics.md §1.2)


@dataclass(frozen=True)
class Documents:
    """Document d: BOS at `starts[d]`, targets at starts[d]+1 .. starts[d]+lengths[d] (stream order)."""

    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.size)


def find_documents(tokens, bos_id: int = BOS_ID) -> Documents:
    """The documents of a stream by its BOS tokens (the records' `_find_docs`): each runs from its
    BOS to the next one inclusive, the last to the end. A stream not starting with BOS starts a
    document at position 0 anyway, and a BOS in the last position (no target of its own) is the
    previous document's last target, so the documents' targets are exactly 1 .. len-1."""
    tok = np.asarray(tokens)
    if tok.ndim != 1 or tok.size < 2:
        raise UserError(f"per-document TTT needs a 1-D stream of at least 2 tokens, got shape {tok.shape}")
    starts = np.flatnonzero(tok[:-1] == bos_id).astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([np.zeros(1, dtype=np.int64), starts])
    ends = np.append(starts[1:], tok.size - 1)
    return Documents(starts, ends - starts)


def doc_queue(docs: Documents) -> np.ndarray:
    """Document indices longest first, ties by position (the records sort by length so a batch's
    documents need about as many chunks; their phase prefix is thus the longest documents)."""
    return np.lexsort((docs.starts, -docs.lengths))


def phase_bounds(n_docs: int, prefix_docs: int, phases: int) -> list[int]:
    """Queue positions after which a phase runs: K*(p+1)//P for p < P (K = min(prefix, n_docs),
    as PHASED_TTT_PREFIX_DOCS / NUM_PHASES), without repeats or 0, and never after the last
    document (a phase there would adapt a model that scores nothing more)."""
    k = min(prefix_docs, n_docs)
    return sorted({k * (p + 1) // phases for p in range(phases)} - {0, n_docs})


@dataclass
class LoRATTTResult:
    result: EvalResult  # global sums over every rank
    isolation: list  # IsolationLedger problems of this rank ([] = isolated)
    ledger: IsolationLedger
    documents: Documents
    phases_run: int
    # nats per document, this rank's documents only (0 elsewhere): diagnostics and the tests'
    # per-document comparisons
    doc_nats: np.ndarray


def phased_lora_ttt(model, tokens, tables: ByteTables, eval_cfg: EvalConfig, ttt_cfg: TTTConfig, device,
                    rank: int = 0, world_size: int = 1, progress=None, events=None,
                    micro_seqs: Optional[int] = None, seed: int = 0, log=None,
                    keep_ledger_log: bool = False) -> LoRATTTResult:
    """Score the whole validation stream with phased per-document LoRA TTT (module docstring).
    Mutates `model` (the phases train it). `progress(done_docs, total_docs)`; `events` gets the
    ("score" | "update", tag, lo, hi) log; `micro_seqs` bounds the rows of one phase-SGD pass;
    `seed` draws the adapters' shared start A0."""
    _check_world(world_size)
    cfg, seq_len = ttt_cfg, eval_cfg.seq_len
    if cfg.lora_chunk_tokens > seq_len:
        raise UserError(f"ttt.lora_chunk_tokens ({cfg.lora_chunk_tokens}) must be at most eval.seq_len ({seq_len}): "
                        "each chunk is scored inside one window")
    micro_seqs = micro_seqs or cfg.batch_seqs
    tok = prepare_stream(tokens, tables, seq_len, device)
    tables = tables.to(device)
    docs = find_documents(tok.cpu().numpy())
    queue = doc_queue(docs)
    bounds = phase_bounds(len(docs), cfg.phase_prefix_docs, cfg.phases)
    edges = [0, *bounds, len(docs)]
    ledger = IsolationLedger(docs.starts, docs.lengths, keep_log=keep_ledger_log)
    lora = BatchedLoRA(model, cfg, device, seed)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nats, bytes
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # targets, top-1 hits
    doc_nats = torch.zeros(len(docs), dtype=torch.float64, device=device)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    t0, batch_no, phases_run = time.perf_counter(), 0, 0
    try:
        for p in model.parameters():  # adapters only: base gradients are never needed here
            p.requires_grad_(False)
        model.eval()
        with lora.attached():
            for a, b in zip(edges[:-1], edges[1:]):
                mine = []
                for lo in range(a, b, cfg.lora_batch_docs):
                    hi = min(lo + cfg.lora_batch_docs, b)
                    if batch_no % world_size == rank:
                        batch = queue[lo:hi]
                        _score_batch(lora, tok, tables, docs, batch, cfg, seq_len, device, sums, counts, doc_nats,
                                     events, ledger)
                        mine.extend(int(d) for d in batch)
                        if progress is not None:
                            progress(hi, len(docs))
                    batch_no += 1
                if b in bounds:
                    if events is not None and world_size > 1:
                        _note_others_scores(mine, docs, rank, world_size, events)
                    _phase_sgd(model, tok, docs, queue[:b], cfg, seq_len, device, rank, world_size, micro_seqs,
                               events, phases_run)
                    phases_run += 1
                    if log is not None:
                        log(f"ttt_phase {phases_run}/{len(bounds)} trained_docs={b} "
                            f"t={time.perf_counter() - t0:.1f}s")
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.eval()
    nats, nbytes = sums.tolist()
    ntok, hits = counts.tolist()
    local = EvalResult(float(nats), int(ntok), int(round(nbytes)), int(hits))
    return LoRATTTResult(all_reduce_result(local, device), ledger.problems, ledger, docs, phases_run,
                         doc_nats.cpu().numpy())


# --------------------------------------------------------------------------------------
# one batch of documents


def _chunk_windows(lengths: np.ndarray, ci: int, chunk: int, seq_len: int):
    """Chunk `ci` of documents with `lengths` targets (`_compute_chunk_window`): the chunk's
    targets cs+1 .. ce (document-relative), its window's inputs ws .. ce-1, the last <= seq_len
    tokens of the document ending at the chunk."""
    ce = np.minimum((ci + 1) * chunk, lengths)
    cs = np.full_like(ce, ci * chunk)
    ws = np.maximum(0, ce - seq_len)
    return cs, ce, ws


def _score_batch(lora: BatchedLoRA, tok, tables, docs, batch, cfg: TTTConfig, seq_len, device, sums, counts,
                 doc_nats, events, ledger) -> None:
    """Score documents `batch` chunk by chunk, each chunk before its own adapter's update."""
    starts, lengths = docs.starts[batch], docs.lengths[batch]
    chunk = cfg.lora_chunk_tokens
    nchunks = -(-lengths // chunk)
    state = lora.fresh(batch, ledger)
    opt = torch.optim.AdamW(state.parameters(), lr=cfg.lora_lr, betas=(cfg.lora_beta1, cfg.lora_beta2),
                            eps=cfg.lora_eps, weight_decay=cfg.lora_weight_decay)
    n = tok.numel()
    for ci in range(int(nchunks.max())):
        rows = np.flatnonzero(nchunks > ci)  # documents with a chunk ci
        cs, ce, ws = _chunk_windows(lengths[rows], ci, chunk, seq_len)
        train = nchunks[rows] - 1 > ci  # a document's last chunk is scored, never trained on
        wl, clen, off = ce - ws, ce - cs, cs - ws
        width, span = int(wl.max()), int(clen.max())
        base = torch.from_numpy(starts[rows] + ws).to(device)[:, None]  # stream position of window input 0
        cols = torch.arange(width, device=device)[None, :]
        real = cols < torch.from_numpy(wl).to(device)[:, None]
        ids = torch.where(real, tok[(base + cols).clamp_max(n - 1)], 0)
        k = torch.arange(span, device=device)[None, :]
        scored = k < torch.from_numpy(clen).to(device)[:, None]
        slab = (torch.from_numpy(off).to(device)[:, None] + k).clamp_max(width - 1)  # window positions
        tgt_pos = (base + slab + 1).clamp_max(n - 1)
        tgt = tok[tgt_pos]
        row_t = torch.from_numpy(rows).to(device)
        with torch.set_grad_enabled(bool(train.any())):
            with model_autocast(device):
                logits = lora.logits(ids, state, row_t, slab)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                  reduction="none").reshape(tgt.shape)
        # Score first: this chunk's sums are committed before any step below sees its targets.
        with torch.no_grad():
            pos, prev = tgt_pos[scored], tok[tgt_pos - 1][scored]
            nbytes = tables.scored_bytes(pos, prev, tgt[scored]).sum()
            sums += torch.stack([nll[scored].to(torch.float64).sum(), nbytes.to(torch.float64)])
            hits = (logits.argmax(dim=-1) == tgt)[scored].sum()
            counts += torch.stack([scored.sum(), hits])
            doc_ids = torch.from_numpy(np.ascontiguousarray(batch[rows])).to(device)
            doc_nats.index_add_(0, doc_ids, (nll * scored).sum(1).to(torch.float64))
        for j, slot in enumerate(rows):
            d, s = int(batch[slot]), int(starts[slot])
            lo_t, hi_t = s + int(cs[j]) + 1, s + int(ce[j])
            ledger.score(d, int(slot), lo_t, hi_t)
            if events is not None:
                events.append(("score", (d, ci), lo_t, hi_t))
        if not train.any():
            continue
        sel = torch.from_numpy(np.flatnonzero(train)).to(device)
        for step in range(cfg.lora_steps):
            if step:  # a further step on the same chunk (TTT_GRAD_STEPS): forward again, train rows only
                with model_autocast(device):
                    logits = lora.logits(ids[sel], state, row_t[sel], slab[sel])
                part = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[sel].reshape(-1),
                                       reduction="none").reshape(tgt[sel].shape)
                loss_rows = (part * scored[sel]).sum(1) / scored[sel].sum(1)
            else:
                loss_rows = ((nll * scored).sum(1) / scored.sum(1))[sel]
            opt.zero_grad(set_to_none=True)
            loss_rows.sum().backward()  # rows own separate adapters: each gets its own chunk's gradient
            opt.step()
            for j in np.flatnonzero(train):
                slot = int(rows[j])
                d, s = int(batch[slot]), int(starts[slot])
                lo_u, hi_u = s + int(ws[j]), s + int(ce[j])  # the window's inputs and the chunk's targets
                ledger.update(d, slot, lo_u, hi_u)
                if events is not None:
                    events.append(("update", (d, ci, step), lo_u, hi_u))


# --------------------------------------------------------------------------------------
# phases: full-parameter SGD on the scored prefix


def _phase_rows(docs: Documents, prefix, seq_len: int) -> np.ndarray:
    """Rows [a, b] (inputs a..b-1, targets a+1..b) cutting each prefix document, in queue order,
    into pieces of at most seq_len targets: no row crosses a document."""
    out = []
    for d in prefix:
        s, n = int(docs.starts[d]), int(docs.lengths[d])
        for k in range(0, n, seq_len):
            out.append((s + k, s + min(k + seq_len, n)))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _step_groups(rows: np.ndarray, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive rows per optimizer step, at most `chunk_tokens` targets each (at least one row)."""
    groups, lo, have = [], 0, 0
    for i, (a, b) in enumerate(rows):
        t = int(b - a)
        if i > lo and have + t > chunk_tokens:
            groups.append((lo, i))
            lo, have = i, 0
        have += t
    if len(rows):
        groups.append((lo, len(rows)))
    return groups


def _phase_sgd(model, tok, docs, prefix, cfg: TTTConfig, seq_len, device, rank, world_size, micro_seqs, events,
               phase: int) -> None:
    """One phase: SGD (the score-first settings) on the prefix documents, all already scored."""
    rows = _phase_rows(docs, prefix, seq_len)
    groups = _step_groups(rows, cfg.chunk_tokens)
    params, restore = _trainable(model, cfg.freeze_blocks)
    opt = _make_optimizer(params, cfg)  # fresh each phase, as the records' global SGD
    n = tok.numel()
    model.train()
    try:
        for gi, (r0, r1) in enumerate(groups):
            lr = chunk_lr(gi, len(groups), cfg.lr, cfg.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            total = int((rows[r0:r1, 1] - rows[r0:r1, 0]).sum())  # the step's targets on all ranks
            s0, s1 = contiguous_share(r1 - r0, rank, world_size)
            for epoch in range(cfg.epochs):
                opt.zero_grad(set_to_none=True)
                for lo in range(r0 + s0, r0 + s1, micro_seqs):
                    part = rows[lo:min(lo + micro_seqs, r0 + s1)]
                    width = int((part[:, 1] - part[:, 0]).max())
                    a = torch.from_numpy(part[:, 0]).to(device)[:, None]
                    cols = torch.arange(width + 1, device=device)[None, :]
                    real = cols <= torch.from_numpy(part[:, 1] - part[:, 0]).to(device)[:, None]
                    seqs = torch.where(real, tok[(a + cols).clamp_max(n - 1)], 0)
                    with model_autocast(device):
                        logits = model(seqs[:, :-1])
                    mask = real[:, 1:]  # padding after a row's end is never a target
                    loss = F.cross_entropy(logits[mask].float(), seqs[:, 1:][mask], reduction="sum")
                    (loss / total).backward()  # this part's share of the step's mean over all ranks
                if world_size > 1:
                    _sum_grads(params)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if events is not None:
                    for a_, b_ in rows[r0:r1]:  # every rank's rows: the update is global
                        events.append(("update", ("phase", phase, gi, epoch), int(a_), int(b_)))
    finally:
        restore()
        model.eval()


def _note_others_scores(mine: list, docs: Documents, rank: int, world_size: int, events: list) -> None:
    """Log, before a phase's updates, the documents the other ranks report as scored in the segment
    (each rank logs its own chunk by chunk), so every rank's log shows the phase's inputs scored."""
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, mine)
    for r, theirs in enumerate(gathered):
        if r == rank:
            continue
        for d in theirs:
            s, n = int(docs.starts[d]), int(docs.lengths[d])
            events.append(("score", ("rank", r, d), s + 1, s + n))


def score_ttt_mode(model, tokens, tables, recipe, dist_info, progress=None, events=None, micro_seqs=None,
                   log=None) -> tuple[EvalResult, list[str]]:
    """The `ttt.mode: phased_lora` entry of pipeline.stages.evaluate.score_ttt: the global result
    and every violation (score-before-update from the event log, then document isolation)."""
    own = [] if events is None else events
    res = phased_lora_ttt(model, tokens, tables, recipe.eval, recipe.ttt, dist_info.device, dist_info.rank,
                          dist_info.world_size, progress=progress, events=own, micro_seqs=micro_seqs,
                          seed=recipe.seed, log=log)
    return res.result, check_score_before_update(own, context=res.documents.starts) + res.isolation
