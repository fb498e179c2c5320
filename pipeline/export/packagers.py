"""The records' other artifact compressors: brotli, byte-shuffled brotli and per-group lrzip
(pg_mechanics.md §4.2.1), beside codec.py's zstd and zlib.

    blob = compress(raw, "brotli_shuffle", 22)      # codec.compress dispatches here
    raw == decompress(blob, what)                   # codec.decompress does, for a non-zstd/zlib blob

Each one packs the container bytes (codec.encode_container) losslessly, so what a blob decodes to
does not depend on how it was packed; `codec.decompress` recognises them from the blob itself:

- brotli: one raw brotli stream, quality min(level, 11), window 2**24. The window is fixed because
  its code fills the stream's first bits (low nibble 0xF), which keeps every brotli blob from
  passing the zlib header check that decompress applies first. `brotli -d` reads it.
- brotli_shuffle (PR #1089 -> the 03-31 to 04-23 records): the container's bytes are reordered
  by a stride-2 byte shuffle, b"BSHF" + one stride byte + every byte at an even offset + every byte
  at an odd offset (fp16 scales' high and low bytes land in separate runs), then brotli as above;
  the magic is inside the brotli stream, as in the records (`_byte_shuffle` of 04-01), and a
  container never starts with it (its first 8 bytes are the header length).
- pergroup (the 1.0611 record, COMPRESSOR=pergroup, origin PR #1586): the int8 code matrices
  (`*.q` entries of two or more dims) are grouped by kind across layers (the entry name with its
  numeric parts as '#': blocks.#.mlp.fc.weight.q), each matrix written column-major (transposed),
  a group's matrices concatenated in layer order and compressed by `lrzip -z -L min(level, 9) -T`
  (ZPAQ; -T skips lrzip's LZ4 compressibility test, which otherwise stores int6 codes raw, see
  `pack`; the record ran without it); everything else (the header, scales, small tensors, LQER
  factors) stays in the container, with the grouped bytes cut out, and is brotli-compressed.
  Groups under MIN_GROUP_BYTES stay in the remainder too (lrzip's own framing would cost more than
  it saves). Framing, like the record's `_pack_streams`: b"PGRP" + uint32 stream count + one
  uint32 length per stream + the streams (little-endian); stream 0 is brotli(uint32 index length +
  JSON index {"groups": [[entry name, ...], ...]} + remainder container), then one lrzip stream per
  group, in index order. The record also reorders rows by a greedy similarity sort before
  transposing; that is not done here.
  lrzip must be installed where the blob is written and where it is read (it is a program, not a
  Python package); its output does not depend on the thread count (checked with -p 1, 2, 4).

Runtime module: the generated script carries it only when the recipe packs or compares with one of
these; it then needs the brotli package (and lrzip for pergroup).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.export.codec import ArtifactError, _ErrorBase

BSHF = b"BSHF"
PGRP = b"PGRP"
LGWIN = 24  # brotli window bits; fixed, see the module docstring
MIN_GROUP_BYTES = 4096  # smaller groups stay in the brotli remainder
LRZIP_FIX = "install it (Debian/Ubuntu: apt-get install lrzip; macOS: brew install lrzip)"


class CompressorUnavailable(_ErrorBase):
    """The compressor a recipe asks for needs something this machine does not have."""


def _brotli():
    try:
        import brotli
    except ImportError:
        raise CompressorUnavailable("this artifact's compressor needs the brotli Python package; pip install brotli, "
                                    "or package with package.compressor zstd") from None
    return brotli


def lrzip_available() -> bool:
    return shutil.which("lrzip") is not None


# ------------------------------------------------------------------------------ byte shuffle


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """b"BSHF" + stride byte + the bytes at offsets 0, stride, 2*stride, ..., then 1, 1+stride, ..."""
    src = np.frombuffer(data, dtype=np.uint8)
    return BSHF + bytes([stride]) + b"".join(src[k::stride].tobytes() for k in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    """Inverse of byte_shuffle (data starts with the BSHF magic)."""
    if len(data) < 5 or data[:4] != BSHF or data[4] < 1:
        raise ArtifactError("artifact's byte-shuffled payload has a bad BSHF header; the blob is corrupt, "
                            "re-run `pgolf run`")
    stride, payload = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    out, start = np.empty_like(payload), 0
    for k in range(stride):
        n = len(range(k, len(payload), stride))
        out[k::stride] = payload[start:start + n]
        start += n
    return out.tobytes()


# ------------------------------------------------------------------------------ per-group lrzip


def _lrzip(args: list[str], data: bytes, suffix_in: str, suffix_out: str) -> bytes:
    if not lrzip_available():
        raise CompressorUnavailable(f"package.compressor pergroup needs the lrzip program, which is not on PATH; "
                                    f"{LRZIP_FIX}, or use package.compressor brotli_shuffle")
    with tempfile.TemporaryDirectory(prefix="pgolf_lrzip_") as tmp:
        src, dst = os.path.join(tmp, "in" + suffix_in), os.path.join(tmp, "out" + suffix_out)
        with open(src, "wb") as f:
            f.write(data)
        # LRZIP=NOCONFIG: no lrzip.conf of this machine changes the bytes
        run = subprocess.run(["lrzip", "-Q", *args, "-o", dst, src], capture_output=True,
                             env={**os.environ, "LRZIP": "NOCONFIG"})
        if run.returncode != 0 or not os.path.exists(dst):
            raise ArtifactError(f"lrzip {' '.join(args)} failed (exit {run.returncode}): "
                                f"{run.stderr.decode(errors='replace').strip()[-300:]}")
        with open(dst, "rb") as f:
            return f.read()


def _header(raw: bytes) -> tuple[int, dict]:
    if len(raw) < 8:
        raise ArtifactError("per-group pack: the container is too short for a header; the blob is corrupt")
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    try:
        header = json.loads(bytes(raw[8:8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"per-group pack: the container header is not JSON ({e}); the blob is corrupt") from None
    header.pop("__metadata__", None)
    return 8 + hlen, header


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _entries(header: dict) -> list[tuple[str, dict]]:
    """(name, info) in data order, checked to tile the data section."""
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    at = 0
    for name, info in items:
        begin, end = info["data_offsets"]
        if begin != at or end < begin:
            raise ArtifactError(f"per-group pack: entry {name!r} is not contiguous in the container")
        at = end
    return items


def _matrix(info: dict) -> tuple[int, int]:
    shape = [int(d) for d in info["shape"]]
    return shape[0], int(np.prod(shape[1:]))


def pergroup_compress(raw: bytes, level: int = 9, min_group_bytes: int = MIN_GROUP_BYTES) -> bytes:
    """The per-group pack of container bytes `raw` (codec.encode_container's output)."""
    brotli = _brotli()
    try:
        base, header = _header(raw)
        entries = _entries(header)
    except (ArtifactError, KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("pergroup packs a pgolf-quant container (codec.encode_container's bytes), and these "
                         "bytes are not one") from None
    kinds: dict[str, list[str]] = {}
    for name, info in entries:
        if info["dtype"] == "I8" and len(info["shape"]) >= 2 and name.endswith(".q"):
            kinds.setdefault(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "#", name), []).append(name)
    size = {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in entries}
    groups = [sorted(names, key=_natural) for _kind, names in sorted(kinds.items())
              if sum(size[n] for n in names) >= min_group_bytes]
    grouped = {n for g in groups for n in g}
    remainder = [raw[:base]] + [raw[base + info["data_offsets"][0]:base + info["data_offsets"][1]]
                                for name, info in entries if name not in grouped]
    index = json.dumps({"groups": groups}, separators=(",", ":")).encode()

    def column_major(name: str) -> bytes:
        begin, end = header[name]["data_offsets"]
        rows, cols = _matrix(header[name])
        return np.frombuffer(raw, dtype=np.int8, count=end - begin, offset=base + begin) \
            .reshape(rows, cols).T.tobytes()

    def pack(group: list[str]) -> bytes:
        # -T: without it lrzip's LZ4 pre-test stores a high-entropy group raw (measured on a trained tiny
        # model's int6 MLP codes: 196,722 bytes for 196,608 in; 137,554 with -T)
        return _lrzip(["-z", "-L", str(min(int(level), 9)), "-T"], b"".join(column_major(n) for n in group),
                      ".bin", ".lrz")

    with ThreadPoolExecutor(max_workers=max(1, min(len(groups), os.cpu_count() or 1))) as pool:
        packed = list(pool.map(pack, groups))
    head = struct.pack("<I", len(index)) + index + b"".join(remainder)
    streams = [brotli.compress(head, quality=11, lgwin=LGWIN), *packed]
    return PGRP + struct.pack(f"<{1 + len(streams)}I", len(streams), *map(len, streams)) + b"".join(streams)


def pergroup_decompress(blob: bytes) -> bytes:
    brotli = _brotli()
    try:
        (count,) = struct.unpack_from("<I", blob, 4)
        lengths = struct.unpack_from(f"<{count}I", blob, 8)
    except struct.error:
        raise ArtifactError("per-group pack is truncated (its stream table is cut off); re-run `pgolf run`") \
            from None
    at, streams = 8 + 4 * count, []
    for n in lengths:
        streams.append(blob[at:at + n])
        at += n
    if at != len(blob) or count < 1:
        raise ArtifactError(f"per-group pack is {len(blob)} bytes, its stream table says {at}; the blob is "
                            "truncated or corrupt, re-run `pgolf run`")
    try:
        head = brotli.decompress(streams[0])
        (ilen,) = struct.unpack_from("<I", head, 0)
        groups = json.loads(head[4:4 + ilen].decode("utf-8"))["groups"]
    except (brotli.error, struct.error, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"per-group pack: its remainder stream is corrupt ({e}); re-run `pgolf run`") from None
    if len(groups) != count - 1:
        raise ArtifactError("per-group pack: its index and its streams disagree; the blob is corrupt")
    rest = memoryview(head)[4 + ilen:]
    base, header = _header(bytes(rest))
    entries = _entries(header)

    with ThreadPoolExecutor(max_workers=max(1, min(len(groups), os.cpu_count() or 1))) as pool:
        unpacked = list(pool.map(lambda s: _lrzip(["-d", "-f"], s, ".lrz", ".bin"), streams[1:]))
    matrices: dict[str, bytes] = {}
    for group, data in zip(groups, unpacked):
        at = 0
        for name in group:
            if name not in header:
                raise ArtifactError(f"per-group pack: its index names {name!r}, which the container lacks")
            rows, cols = _matrix(header[name])
            chunk = np.frombuffer(data, dtype=np.int8, count=rows * cols, offset=at) if rows * cols else \
                np.empty(0, np.int8)
            matrices[name] = chunk.reshape(cols, rows).T.tobytes()
            at += rows * cols
        if at != len(data):
            raise ArtifactError("per-group pack: a group's lrzip stream has the wrong size; the blob is corrupt")
    out, at = [bytes(rest[:base])], base
    for name, info in entries:
        n = info["data_offsets"][1] - info["data_offsets"][0]
        if name in matrices:
            out.append(matrices[name])
        else:
            out.append(bytes(rest[at:at + n]))
            at += n
    if at != len(rest):
        raise ArtifactError("per-group pack: the remainder container has the wrong size; the blob is corrupt")
    return b"".join(out)


# ------------------------------------------------------------------------------ entry points


def compress(raw: bytes, compressor: str, level: int = 22) -> bytes:
    if compressor == "pergroup":
        return pergroup_compress(raw, level)
    brotli = _brotli()
    payload = byte_shuffle(raw) if compressor == "brotli_shuffle" else raw
    if compressor not in ("brotli", "brotli_shuffle"):
        raise ValueError(f"unknown compressor {compressor!r}; expected brotli, brotli_shuffle or pergroup")
    return brotli.compress(payload, quality=min(int(level), 11), lgwin=LGWIN)


def decompress(blob: bytes, what: str) -> bytes:
    """A per-group pack or a (byte-shuffled) brotli stream back to the container bytes; `what`
    opens the error when it is neither (codec.decompress says which readers it tried first)."""
    if blob[:4] == PGRP:
        return pergroup_decompress(blob)
    brotli = _brotli()
    try:
        raw = brotli.decompress(blob)
    except brotli.error as e:
        raise ArtifactError(f"{what}, and it does not decode as a brotli stream either (truncated or corrupt: {e}); "
                            "re-run `pgolf run`") from None
    return byte_unshuffle(raw) if raw[:4] == BSHF else raw
