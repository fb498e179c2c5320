"""Stage `evaluate`: load a prepared data directory and score a model on its validation split.

    data = load_data(data_dir, recipe)               # shards, val stream, byte tables, checks
    res = score(model, data, recipe, dist_info, log, label="roundtrip")
    res = score_ttt(model, data, recipe, dist_info, log)   # score-first (or the flagged PR #684 mode)

Scores are plain dicts (val_loss, val_bpb, token_count, byte_count, top1_accuracy, eval_time_s)
so they go straight into manifests and report.json.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from eval.byte_tables import ByteTables
from eval.scorer import EvalResult, evaluate
from eval.ttt import check_score_before_update, pre_score_full_val_ttt, score_first_ttt
from pipeline.config import Recipe
from pipeline.data.shards import check_token_ids, list_shards, load_byte_sidecar, load_shard
from pipeline.data.tokenizer import check_vocab, load_tokenizer
from pipeline.errors import UserError

# Held-out top-1 accuracy above this is implausible for natural text: a leak alarm
# (seed_components.md §1.3 test 6).
TOP1_ALARM = 0.70


@dataclass
class Data:
    dir: Path
    train_shards: list
    val_tokens: np.ndarray
    tables: ByteTables
    val_raw_bytes: Optional[int]  # UTF-8 bytes of the validation text (from meta.json), if known
    val_stream_bytes: int  # bytes the scorer accounts for over the whole val stream
    # The byte sidecar (*_val_bytes_*.bin, pg_mechanics.md §2.7): uint16 [len(val_tokens)], raw
    # bytes per val token, or None. When present it is attached to `tables` and every score
    # counts it instead of the table formula.
    val_byte_counts: Optional[np.ndarray] = None
    byte_source: str = "tables"  # "sidecar" or "tables": what the scores divide by


def load_data(data_dir: Path, recipe: Recipe, tokenizer_path: Optional[Path] = None) -> Data:
    """Shards of `data_dir` plus its tokenizer (`tokenizer_path`, default data_dir/tokenizer.model)
    and, when the directory has them, the val byte sidecars (then `byte_source` is "sidecar").
    Raises UserError for a missing or mismatched directory, tokenizer or sidecar."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; create it with "
                        f"`pgolf data prepare --text FILE --out {data_dir}`.")
    train = list_shards(data_dir, "train")
    val_paths = list_shards(data_dir, "val")
    tok_path = Path(tokenizer_path) if tokenizer_path else data_dir / "tokenizer.model"
    if not tok_path.exists():
        raise UserError(f"tokenizer {tok_path} does not exist; re-run `pgolf data prepare --out {data_dir}` "
                        f"or point at the .model file that tokenized these shards.")
    from pipeline.data import tiktoken_file  # stdlib only: a tiktoken directory's ranks, without tiktoken

    if tiktoken_file.tokenizer_kind(data_dir, tok_path) == tiktoken_file.KIND:
        pieces, sp, bos = tiktoken_file.token_bytes_by_id(tok_path), None, tiktoken_file.BOS_ID
        if len(pieces) != recipe.model.vocab_size:
            raise UserError(f"{tok_path}: the tiktoken tokenizer has {len(pieces)} shard ids (its ranks + 4 reserved) "
                            f"but model.vocab_size is {recipe.model.vocab_size}; set model.vocab_size: {len(pieces)}.")
    else:
        sp = load_tokenizer(tok_path)
        check_vocab(sp, recipe.model.vocab_size, tok_path)
        bos = sp.bos_id()
    val = np.concatenate([np.asarray(load_shard(p), dtype=np.uint16) for p in val_paths])
    sidecar = load_byte_sidecar(val_paths)
    if recipe.data.max_val_tokens:
        val = val[: recipe.data.max_val_tokens + 1]
        sidecar = None if sidecar is None else sidecar[: recipe.data.max_val_tokens + 1]
    check_token_ids(val, recipe.model.vocab_size, f"the validation split of {data_dir}")
    tables = (ByteTables.from_sentencepiece(sp, recipe.model.vocab_size) if sp is not None
              else ByteTables.from_token_bytes(pieces, recipe.model.vocab_size))
    if sidecar is not None:
        bad = np.flatnonzero((val == bos) & (sidecar != 0))  # BOS stands for no text
        if bad.size:
            raise UserError(f"the byte sidecar of {data_dir} gives {int(sidecar[bad[0]])} bytes to val token "
                            f"{int(bad[0])}, a BOS (0 bytes), so it does not match these shards; re-export both.")
        tables = tables.with_token_bytes(sidecar)
    meta_path = data_dir / "meta.json"
    raw = json.loads(meta_path.read_text()).get("val_raw_bytes") if meta_path.exists() else None
    if recipe.data.max_val_tokens:
        raw = None  # a capped stream no longer stands for the whole text
    return Data(data_dir, train, val, tables, raw, int(tables.count_bytes(val)), sidecar, tables.byte_source)


def _as_dict(res: EvalResult, seconds: float) -> dict:
    return {"val_loss": res.val_loss, "val_bpb": res.val_bpb, "token_count": res.token_count,
            "byte_count": res.byte_count, "top1_accuracy": res.top1_accuracy, "eval_time_s": seconds}


def _progress_every(log, label: str):
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            log(f"eval_progress {label} {done}/{total}")

    return progress


def _alarm(res: dict, label: str, log) -> None:
    if res["top1_accuracy"] > TOP1_ALARM:
        log(f"ALARM {label}: held-out top-1 accuracy {res['top1_accuracy']:.3f} > {TOP1_ALARM}: "
            f"this is implausible for text and suggests a future-token leak (run `pgolf audit`).")


def score(model, data: Data, recipe: Recipe, dist_info, log, label: str) -> dict:
    t0 = time.perf_counter()
    res = evaluate(model, data.val_tokens, data.tables, recipe.eval, dist_info.device, dist_info.rank,
                   dist_info.world_size, progress=_progress_every(log, label))
    out = _as_dict(res, time.perf_counter() - t0)
    log(f"{label}_exact mode={recipe.eval.mode} seq_len={recipe.eval.seq_len} stride={recipe.eval.stride} "
        f"val_loss={out['val_loss']:.8f} val_bpb={out['val_bpb']:.8f} val_tokens={out['token_count']} "
        f"val_bytes={out['byte_count']} eval_time={out['eval_time_s']:.1f}s")
    _alarm(out, label, log)
    return out


# TTT modes whose module the generated script carries only when a recipe uses them (by name, so
# pipeline.codegen's import scan does not ship them with every recipe). Each has
# score_ttt_mode(model, tokens, tables, recipe, dist_info, progress, events, micro_seqs, log)
# -> (EvalResult, violations).
TTT_MODE_MODULES = {"phased_lora": "eval.ttt_lora"}


def ttt_modules(recipe: Recipe) -> list[str]:
    """The extra runtime modules `recipe`'s TTT needs (pipeline.codegen adds them)."""
    mod = TTT_MODE_MODULES.get(recipe.ttt.mode) if recipe.ttt.enabled else None
    return [mod] if mod else []


def score_ttt(model, data: Data, recipe: Recipe, dist_info, log) -> dict:
    t0 = time.perf_counter()
    events: list = []
    # Each TTT step's sequences are shared by the ranks; one forward/backward pass holds at most
    # a reference rank's share of them (the memory of the run being reproduced).
    micro = max(1, -(-recipe.ttt.batch_seqs // recipe.train.reference_world_size))
    if recipe.ttt.mode in TTT_MODE_MODULES:
        mode = importlib.import_module(TTT_MODE_MODULES[recipe.ttt.mode])
        res, violations = mode.score_ttt_mode(model, data.val_tokens, data.tables, recipe, dist_info,
                                              progress=_progress_every(log, "ttt"), events=events,
                                              micro_seqs=micro, log=log)
    else:
        fn = score_first_ttt if recipe.ttt.mode == "score_first" else pre_score_full_val_ttt
        res = fn(model, data.val_tokens, data.tables, recipe.eval, recipe.ttt, dist_info.device, dist_info.rank,
                 dist_info.world_size, progress=_progress_every(log, "ttt"), events=events, micro_seqs=micro)
        violations = check_score_before_update(events)
    out = _as_dict(res, time.perf_counter() - t0)
    out["compliant"] = not violations
    if recipe.ttt.mode != "pre_score_full_val" and violations:
        raise RuntimeError(f"{recipe.ttt.mode} TTT broke score-first order or document isolation: "
                           f"{violations[:3]}")  # a bug, not input
    log(f"ttt_exact mode={recipe.ttt.mode} val_loss={out['val_loss']:.8f} val_bpb={out['val_bpb']:.8f} "
        f"chunks_trained_before_scored={len(violations)} eval_time={out['eval_time_s']:.1f}s")
    _alarm(out, "ttt", log)
    return out


def make_validator(data: Data, recipe: Recipe, dist_info):
    """Periodic in-training validation: non-overlapping windows, untimed by the trainer."""
    cfg = replace(recipe.eval, mode="nonoverlap")

    def validate(model) -> dict:
        res = evaluate(model, data.val_tokens, data.tables, cfg, dist_info.device, dist_info.rank,
                       dist_info.world_size)
        return {"val_loss": res.val_loss, "val_bpb": res.val_bpb}

    return validate


def val_fingerprint(data: Data) -> dict:
    """The validation set's identity: sha256 of its tokens as loaded (little-endian uint16, after any
    `data.max_val_tokens` cap) and of the per-token byte counts when a byte sidecar is used. Every
    seed of a submission must have scored the same one."""
    h = hashlib.sha256(np.ascontiguousarray(data.val_tokens, dtype="<u2").tobytes())
    counts = data.val_byte_counts
    if counts is not None:
        h.update(np.ascontiguousarray(counts, dtype="<u2").tobytes())
    return {"val_sha256": h.hexdigest(), "val_token_count": int(data.val_tokens.size)}


def score_train_slice(model, data: Data, recipe: Recipe, dist_info, log) -> dict:
    """The diagnostic of `eval.train_tokens`: the first N training tokens scored like the validation
    set (same windows and byte tables; no TTT, no leak alarm: training text is expected to be
    remembered). Returns the same dict as `score`."""
    n = recipe.eval.train_tokens
    parts, have = [], 0
    for path in data.train_shards:
        if have > n:
            break
        shard = np.asarray(load_shard(path), dtype=np.uint16)[: n + 1 - have]
        parts.append(shard)
        have += shard.size
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    t0 = time.perf_counter()
    tables = replace(data.tables, token_bytes=None)  # a byte sidecar counts validation tokens only
    res = evaluate(model, tokens, tables, recipe.eval, dist_info.device, dist_info.rank, dist_info.world_size)
    out = _as_dict(res, time.perf_counter() - t0)
    log(f"train_slice_exact tokens={out['token_count']} val_loss={out['val_loss']:.8f} val_bpb={out['val_bpb']:.8f} "
        f"top1_accuracy={out['top1_accuracy']:.4f} (training tokens: a diagnostic, off the clock)")
    return out

