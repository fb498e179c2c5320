"""Crash-safe file writes and content hashes, shared by every stage.

A write goes to a temporary name in the same directory and is renamed into place, so a reader
(or a resumed run) never sees a half-written file, even if the process is killed mid-write.
Standard library only: the generated submission script bundles it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (torch.save, savefig):
    flushed to disk and renamed onto `path` when the block ends normally, removed otherwise.
    The one mechanism behind every write pgolf makes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path) -> None:
    """`torch.save(obj, path)`, atomically (torch is imported here: the rest of the module is stdlib)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write(path, chunks: Iterable[bytes] | bytes) -> None:
    if isinstance(chunks, (bytes, bytearray)):
        chunks = (chunks,)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def atomic_write_text(path, text: str) -> None:
    """`text` as UTF-8, written atomically."""
    atomic_write(path, text.encode("utf-8"))


def write_json_atomic(path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def canonical_hash(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): the same content, the same key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
