"""The output of `pgolf data prepare`: staged in a hidden sibling, committed by rename, with its shards
streamed through one buffer and its meta.json (see `pipeline.data.prepare` for the rules).

    meta = build_into(out_dir, source, source_sha, build, overwrite)   # build(stage) -> meta dict
    tokens, n_shards = write_split(stage, "fineweb", "val", arrays, shard_size)
    meta = read_meta(out_dir)                                          # None when absent or unreadable
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.data.shards import MAX_TOKEN, shard_name, write_shard
from pipeline.data.tokenizer import BOS_ID
from pipeline.errors import UserError
from pipeline.fileio import write_json_atomic

META_FILE = "meta.json"


def read_meta(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(out_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_into(out_dir: Path, source: Path, source_sha: str, build: Callable[[Path], dict],
                overwrite: bool = False) -> dict:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file; pass a directory to `--out`.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # Never replace a folder the user has: only an earlier prepare's output, and only when asked.
        if read_meta(out_dir) is None:
            raise UserError(
                f"output directory {out_dir} is not empty and is not a `pgolf data prepare` output; "
                f"choose another output directory (pgolf does not delete it)."
            )
        if not overwrite:
            raise UserError(
                f"output directory {out_dir} already holds a prepared dataset; pass --overwrite to replace it, "
                f"or choose another output directory."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.prepare-", dir=out_dir.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary shared data dir
    try:
        meta = build(stage)
        write_json_atomic(stage / META_FILE, meta)  # last: a stage with meta.json is complete
        if out_dir.is_dir():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(stage, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return meta


class ShardBuffer:
    """Streams one split into consecutive shards through a single uint16 buffer of `shard_size`
    tokens, as the challenge's exporter does, so memory holds one shard at most however large
    the input (2 bytes a token: 200 MB at the challenge's 10^8). Documents straddle shards."""

    def __init__(self, out_dir: Path, prefix: str, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.buf = np.empty(shard_size, dtype=np.uint16)  # pages are only touched as it fills
        self.fill = 0
        self.n_tokens = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > MAX_TOKEN):
            bad = int(tokens.max()) if int(tokens.max()) > MAX_TOKEN else int(tokens.min())
            raise UserError(f"token id {bad} does not fit the shard format's uint16 payload (ids 0..{MAX_TOKEN}); "
                            f"use a tokenizer with at most 65,536 ids.")
        pos = 0
        while pos < tokens.size:
            take = min(self.buf.size - self.fill, tokens.size - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.buf.size:
                self._flush()
        self.n_tokens += tokens.size

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.prefix, self.split, len(self.paths))
        write_shard(path, self.buf[: self.fill])
        self.paths.append(path)
        self.fill = 0

    def close(self) -> list[Path]:
        if self.fill:
            self._flush()
        self.buf = np.empty(0, dtype=np.uint16)
        return self.paths


def write_split(stage: Path, prefix: str, split: str, arrays, shard_size: int) -> tuple[int, int]:
    """Write a split's token arrays (each `[BOS] + tokens`) as shards; return (tokens, shards)."""
    writer = ShardBuffer(stage, prefix, split, shard_size)
    for arr in arrays:
        writer.add(arr)
    paths = writer.close()
    return writer.n_tokens, len(paths)


def make_meta(source: Path, kind: str, source_sha: str, split_rule: str, prefix: str, tok: dict,
          written: dict[str, tuple[int, int]], raw_bytes: dict[str, int], roundtrip: bool,
          n_docs: dict[str, int], **extra) -> dict:
    """meta.json of a prepared directory. `written[split]` is (tokens, shards) from _write_split."""
    return {
        "source": source.name, "source_kind": kind, "source_sha256": source_sha, **extra,
        "split_rule": split_rule, "prefix": prefix, **tok, "bos_id": BOS_ID,
        "train_tokens": written["train"][0], "val_tokens": written["val"][0],
        "train_shards": written["train"][1], "val_shards": written["val"][1],
        "train_raw_bytes": raw_bytes["train"], "val_raw_bytes": raw_bytes["val"],
        "val_roundtrip_exact": roundtrip, "n_docs": n_docs,
    }
