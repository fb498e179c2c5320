"""What produced a run: content hashes of its data, tokenizer and code.

    hashes = FileHashCache(cache_root() / "file_hashes.json")
    ident = data_identity(data, hashes)        # {"train", "val", "tokenizer", "train_docs", "tag"}
    code = code_identity(recipe)               # {"pgolf": version, "runtime_sha256": ...}

Every stage manifest and every training checkpoint is keyed on these, never on names or sizes: a
run on other data, another tokenizer or other code cannot reuse what these produced. Hashing a
dataset means reading it, so each shard's sha256 (and its count of BOS tokens, i.e. documents) is
remembered by (resolved path, size, mtime) and a 10 GB dataset is read once, not on every run.

Not part of the shipped script (it caches nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.shards import HEADER_BYTES, list_shards, read_header
from pipeline.errors import UserError
from pipeline.fileio import canonical_hash, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
BOS_ID = 1
_BLOCK = 1 << 24  # bytes per read; even, so a block never splits a uint16 token


def cache_root() -> Path:
    """Where pgolf keeps what it can rebuild: $PGOLF_CACHE (unset or empty: `.cache/` in the
    checkout); created on first write. Raises UserError when it names something that is not a folder."""
    root = Path(os.environ.get("PGOLF_CACHE") or REPO_ROOT / ".cache")
    if root.exists() and not root.is_dir():
        raise UserError(f"PGOLF_CACHE={root} is an existing file, not a folder; point it at a folder (it is "
                        f"created if missing) or unset it to use {REPO_ROOT / '.cache'}.")
    return root


class FileHashCache:
    """sha256 (and BOS count for shards) of files, remembered by (path, size, mtime_ns)."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        self.entries: dict = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs re-hashing

    def digest(self, file: Path, shard: bool = False) -> dict:
        """{"sha256": hex, "bos": documents in the payload (shards only)} of `file`."""
        file = Path(file).resolve()
        st = file.stat()
        key = str(file)
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.entries.get(key)
        if hit and hit.get("stamp") == stamp and (not shard or "bos" in hit):
            return hit
        if shard:
            read_header(file)  # a bad header or truncated payload is a clear error, not a hash of junk
        h, bos = hashlib.sha256(), 0
        with open(file, "rb") as f:
            if shard:
                head = f.read(HEADER_BYTES)
                h.update(head)
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
                if shard:
                    bos += int(np.count_nonzero(np.frombuffer(block, dtype="<u2") == BOS_ID))
        entry = {"stamp": stamp, "sha256": h.hexdigest()}
        if shard:
            entry["bos"] = bos
        self.entries[key] = entry
        self.dirty = True
        return entry

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self.dirty = False
        except OSError:
            pass  # a read-only cache folder only costs re-hashing next time


def _safe_tag(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "data"
    return cleaned[:40]


def data_identity(data_dir: Path, tokenizer_path: Path, hashes: FileHashCache) -> dict:
    """Content identity of a data directory: one hash per split over its shards' (name, sha256), the
    tokenizer's sha256, the byte sidecar's when present, the number of training documents, and
    `tag`, a short folder name `<dir name>-<8 hex>` over all of them."""
    data_dir = Path(data_dir)
    train = [(p.name, hashes.digest(p, shard=True)) for p in list_shards(data_dir, "train")]
    val = [(p.name, hashes.digest(p, shard=True)["sha256"]) for p in list_shards(data_dir, "val")]
    ident = {
        "train": canonical_hash([(n, d["sha256"]) for n, d in train]),
        "val": canonical_hash(val),
        "tokenizer": hashes.digest(tokenizer_path)["sha256"],
        "train_docs": sum(d["bos"] for _, d in train),
    }
    sidecars = sorted(data_dir.glob("*_val_bytes_*.bin"))
    if sidecars:
        ident["val_bytes"] = canonical_hash([(p.name, hashes.digest(p)["sha256"]) for p in sidecars])
    hashes.save()
    ident["tag"] = f"{_safe_tag(data_dir.resolve().name)}-{canonical_hash(ident)[:8]}"
    return ident


def code_identity(recipe) -> dict:
    """The package version and one sha256 over the source of every runtime module the recipe's
    submission bundles (pipeline.codegen.runtime_modules): the code that computes its numbers."""
    from pipeline import __version__
    from pipeline.codegen import runtime_modules

    h = hashlib.sha256()
    for rel in runtime_modules(recipe):
        h.update(rel.encode() + b"\0" + (REPO_ROOT / rel).read_bytes() + b"\0")
    return {"pgolf": __version__, "runtime_sha256": h.hexdigest()}


def safe_join(root: Path, *parts: str) -> Path:
    """`root/parts...`, resolved, refusing any result outside `root` (a name like `../x` or an
    absolute path). Every folder pgolf writes under a user-given root is built with this."""
    root_resolved = Path(root).resolve()
    path = root_resolved.joinpath(*parts).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise UserError(f"refusing to write {path}: it is outside {root_resolved} "
                        f"(from the name {'/'.join(parts)!r}); names must not contain '..' or '/'.")
    return path
