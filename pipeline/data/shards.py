"""The challenge's token-shard file format, byte for byte.

A shard is a 1,024-byte header of 256 little-endian int32 values (magic 20240520, version 1,
token count n, then zeros) followed by n little-endian uint16 token ids; the file is exactly
1024 + 2n bytes. Files are named `{prefix}_{split}_{index:06d}.bin` (the challenge uses the
prefix `fineweb`), and one split holds at most `SHARD_SIZE` tokens per file.

Byte sidecars (pg_mechanics.md §1.2, §2.7): an export whose tokenizer runs on transformed text
(CaseOps) adds `{prefix}_val_bytes_{index:06d}.bin` beside each val shard, in the same format,
holding for each token the raw UTF-8 bytes it stands for (BOS 0). `load_byte_sidecar` pairs
them with the val shards and returns one array parallel to the val stream.

Use:
    write_shard(path, tokens)            # atomic
    n = read_header(path)                # validates magic, version and file size
    toks = load_shard(path)              # read-only np.memmap of uint16
    paths = list_shards(data_dir, "val")
    counts = load_byte_sidecar(paths)    # uint16 array parallel to the val stream, or None
    ShardWriter(out_dir, "data", "train") streams documents into consecutive shards.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.fileio import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_SIZE = 10**8  # tokens per shard file, as in the challenge exporter
MAX_TOKEN = 65535  # uint16 payload

_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.bin"


def sidecar_name(prefix: str, index: int) -> str:
    """Name of the byte sidecar of val shard `index` (`{prefix}_val_bytes_{index:06d}.bin`)."""
    return shard_name(prefix, "val_bytes", index)


def write_shard(path: Path, tokens) -> None:
    """Write `tokens` (any 1-D integer sequence, each in [0, 65535]) as one shard, atomically."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard expects a 1-D token sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"write_shard expects integer token ids, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN:
            bad = hi if hi > MAX_TOKEN else lo
            raise UserError(
                f"{path}: token id {bad} does not fit the shard format's uint16 payload "
                f"(ids must be 0..{MAX_TOKEN}); use a tokenizer with vocab_size <= 65536."
            )
    if arr.size >= 2**31:
        raise UserError(f"{path}: {arr.size} tokens exceed the int32 header count; split it.")
    header = np.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    payload = arr.astype(_TOKEN_DTYPE, copy=False)
    atomic_write(path, [header.tobytes(), payload.tobytes()])


def read_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard file not found; run `pgolf data prepare` to build it.")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: shard file is empty (0 bytes); delete it and re-run `pgolf data prepare`.")
    if size < HEADER_BYTES:
        raise UserError(
            f"{path}: truncated shard header: expected at least {HEADER_BYTES} bytes, "
            f"got {size}; re-run `pgolf data prepare`."
        )
    header = np.fromfile(path, dtype=_HEADER_DTYPE, count=HEADER_INTS)
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise UserError(
            f"{path}: bad shard magic: expected {MAGIC}, got {magic}; this is not a "
            f"challenge-format token shard (re-create it with `pgolf data prepare`)."
        )
    if version != VERSION:
        raise UserError(
            f"{path}: unsupported shard version: expected {VERSION}, got {version}; "
            f"re-create it with `pgolf data prepare`."
        )
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        kind = "truncated" if size < expected else "oversized"
        raise UserError(
            f"{path}: {kind} shard payload: header says {n} tokens, so expected {expected} "
            f"bytes, but the file has {size}; re-run `pgolf data prepare`."
        )
    return n


def load_shard(path: Path) -> np.ndarray:
    """The payload of a validated shard as a read-only uint16 memmap (no copy)."""
    n = read_header(path)
    if n == 0:
        # mmap cannot map zero bytes; an empty array keeps callers uniform.
        return np.zeros(0, dtype=_TOKEN_DTYPE)
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def check_token_ids(tokens: np.ndarray, vocab_size: int | None, where) -> None:
    """Raise UserError when `tokens` (any integer array) holds an id >= `vocab_size`: the model's
    embedding has no row for it (an IndexError on the CPU, a device-side assert on CUDA). `where`
    names the data in the message. None checks nothing."""
    if vocab_size is None or not tokens.size:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        raise UserError(f"{where} holds token id {top} >= model.vocab_size {vocab_size}; prepare the data with "
                        f"a matching tokenizer (`pgolf data audit` finds such ids in every shard).")


def list_shards(data_dir: Path, split: str) -> list[Path]:
    """Sorted shard files of one split (`*_{split}_NNNNNN.bin`) in `data_dir`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data directory {data_dir} does not exist; run `pgolf data prepare` to build it "
            f"(or set data.dir to a prepared directory)."
        )
    # Only an all-digit index after the split counts: the CaseOps byte sidecars
    # (`*_val_bytes_000000.bin`) also match the plain glob but are not token shards.
    index_re = re.compile(rf"_{re.escape(split)}_\d+\.bin$")
    found = sorted(p for p in data_dir.glob(f"*_{split}_*.bin") if index_re.search(p.name))
    if not found:
        raise UserError(
            f"data directory {data_dir} has no {split} shards (*_{split}_NNNNNN.bin); "
            f"run `pgolf data prepare` to build them."
        )
    return found


_VAL_SHARD_RE = re.compile(r"^(.+)_val_(\d+)\.bin$")
_SIDECAR_RE = re.compile(r"^(.+)_val_bytes_(\d+)\.bin$")


def load_byte_sidecar(val_paths: list[Path]):
    """The byte sidecar of the val shards `val_paths` (as `list_shards(dir, "val")` returns
    them), concatenated in the same order: a uint16 array with one entry per val token, or
    None when the directory has no `*_val_bytes_*.bin` file.

    Each val shard `P_val_NNNNNN.bin` needs `P_val_bytes_NNNNNN.bin` with the same token count.
    Raises UserError when a sidecar is missing, has no val shard of its own, has a different
    count, or is not a valid shard file.
    """
    val_paths = [Path(p) for p in val_paths]
    if not val_paths:
        return None
    data_dir = val_paths[0].parent
    present = sorted(p for p in data_dir.glob("*_val_bytes_*.bin") if _SIDECAR_RE.match(p.name))
    if not present:
        return None
    wanted = []
    for p in val_paths:
        m = _VAL_SHARD_RE.match(p.name)
        if m is None or p.parent != data_dir:
            raise ValueError(f"{p} is not a val shard of {data_dir}")
        wanted.append(data_dir / f"{m.group(1)}_val_bytes_{m.group(2)}.bin")  # same index digits
    extra = sorted(set(present) - set(wanted))
    if extra:
        raise UserError(
            f"{extra[0]}: byte sidecar without a matching val shard in {data_dir} (the val shards' "
            f"sidecars are {', '.join(w.name for w in wanted)}); delete it or add its shard.")
    missing = [w for w in wanted if not w.is_file()]
    if missing:
        raise UserError(
            f"{data_dir} has byte sidecars (*_val_bytes_*.bin) but not {missing[0].name}, so "
            f"the bytes of the tokens in {missing[0].name.replace('_val_bytes_', '_val_')} are "
            f"unknown; copy the complete export (every val shard with its sidecar).")
    parts = []
    for shard, side in zip(val_paths, wanted):
        n_tok, n_side = read_header(shard), read_header(side)
        if n_tok != n_side:
            raise UserError(
                f"{side}: the byte sidecar has {n_side} counts but {shard.name} has {n_tok} "
                f"tokens; they come from different exports, so re-download or re-export both.")
        parts.append(np.asarray(load_shard(side), dtype=np.uint16))
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class ShardWriter:
    """Streams token arrays of one split into consecutive shards of at most `shard_size` tokens.

    Documents may straddle two shards, as in the challenge exporter: the stream is what matters,
    not the file boundaries. Call `close()` to flush the last (shorter) shard; it returns the
    written paths. A split that received no tokens writes no file.
    """

    def __init__(self, out_dir: Path, prefix: str, split: str, shard_size: int = SHARD_SIZE):
        self.out_dir, self.prefix, self.split = Path(out_dir), prefix, split
        self.shard_size = shard_size
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.paths: list[Path] = []
        self.n_tokens = 0

    def add(self, tokens) -> None:
        # int32 halves the buffer of int64 and holds any id the format allows (< 65536);
        # write_shard still range-checks every value.
        arr = np.asarray(tokens, dtype=np.int32)
        self._pending.append(arr)
        self._pending_n += arr.size
        self.n_tokens += arr.size
        while self._pending_n >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        path = self.out_dir / shard_name(self.prefix, self.split, len(self.paths))
        write_shard(path, buf[:n])
        self.paths.append(path)
        rest = buf[n:]
        self._pending = [rest] if rest.size else []
        self._pending_n = rest.size

    def close(self) -> list[Path]:
        if self._pending_n:
            self._flush(self._pending_n)
        return list(self.paths)
