"""`pgolf data prepare`: turn a text or jsonl file into challenge-format shards + tokenizer.

Split rules:
* text  - nanoGPT shakespeare_char's: the first int(0.9 * n) *bytes* train, the rest val (the
          cut moves forward to the next UTF-8 character boundary). Each split is one document,
          `[BOS] + encode(split_text)`.
* jsonl - the challenge exporter's: one JSON object with a "text" field per line; the first
          `val_docs` documents (default max(1, 10%)) are val, the rest train; each document is
          `[BOS] + encode(text)`.

Without a tokenizer, a lossless BPE (see `tokenizer`) is trained on the *training split only*
(so nothing about val leaks into it); with one, it is checked and copied in. Either way the
byte tables are built once (`eval.byte_tables`), so a tokenizer whose bytes cannot be counted
exactly is refused here, before any shard is written. The output directory holds
`{prefix}_{train,val}_NNNNNN.bin`, `tokenizer.model` and `meta.json`. A text longer than
`_ENCODE_CHUNK_CHARS` is encoded in parts only when that gives the whole text's tokens
(`tokenizer.chunk_safe`).

Atomicity: everything is built in a hidden sibling directory and renamed into place, so an
interrupted prepare leaves the old output (or nothing) behind; only a crash in the instant
between the two renames of a replacement leaves the old output in a hidden `.NAME.old-*`
sibling instead. The jsonl path streams the file (a few passes, nothing held in memory but one
shard buffer and the tokenizer's capped training text). An existing output directory is
replaced only if it is an earlier prepare's output and `overwrite` is given (`--overwrite`); any
other non-empty directory is refused with a UserError, so a typo in `--out` cannot delete
unrelated files or a dataset.

Use:
    meta = prepare_text(Path("input.txt"), Path("data/shakes_sp1024"), vocab_size=1024)
    meta = prepare_jsonl(Path("docs.jsonl"), Path("data/docs"), val_docs=1000)
    meta = ensure_prepared(out_dir, text_path=Path("input.txt"))   # no-op when up to date
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from eval.byte_tables import ByteTables
from pipeline.data.shards import MAX_TOKEN, SHARD_SIZE, list_shards, read_header, shard_name, write_shard
from pipeline.data.tokenizer import (
    BOS_ID,
    check_vocab,
    chunk_safe,
    is_lossless,
    load_tokenizer,
    train_tokenizer_docs,
)
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, file_sha256, write_json_atomic

DEFAULT_VOCAB = 1024
TOKENIZER_FILE = "tokenizer.model"
META_FILE = "meta.json"
TRAIN_FRACTION = 0.9
# The challenge's export (data/download_hf_docs_and_tokenize.py; pg_mechanics.md §1.1, §1.5): shards
# named fineweb_{val,train}_NNNNNN.bin, the first 50,000 documents (or the docs sidecar's
# `docs_val`) validation.
CHALLENGE_PREFIX = "fineweb"
CHALLENGE_VAL_DOCS = 50_000
# SentencePiece holds its whole training text in memory (several times over); beyond this many
# bytes of training text, more data barely changes a small vocabulary.
TOKENIZER_MAX_TRAIN_BYTES = 200_000_000
_ENCODE_BATCH_DOCS = 256
# A single text longer than this is encoded in pieces cut just before a space (see _encode).
_ENCODE_CHUNK_CHARS = 4_000_000


def _require_file(path: Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found; pass an existing file to `pgolf data prepare {flag}`.")
    return path


def text_split_point(data: bytes) -> int:
    """Byte offset where val starts: int(0.9 * n), moved forward off UTF-8 continuation bytes."""
    cut = int(len(data) * TRAIN_FRACTION)
    while cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut += 1
    return cut


def _encode(sp, text: str, chunkable: bool) -> np.ndarray:
    """`[BOS] + sp.encode(text)` as int32, without one huge Python list for huge texts.
    `chunkable` must be `chunk_safe(sp)`: only then is a long text encoded in parts."""
    if not chunkable or len(text) <= _ENCODE_CHUNK_CHARS:
        return np.array([BOS_ID] + sp.encode(text), dtype=np.int32)
    # chunk_safe: no piece can span a cut placed right before a space, and no part gains a
    # dummy "▁" or loses its leading space, so chunked encoding equals whole-text encoding.
    parts, start = [np.array([BOS_ID], dtype=np.int32)], 0
    while start < len(text):
        end = min(start + _ENCODE_CHUNK_CHARS, len(text))
        if end < len(text):
            # Cut before the last space in (start, end]; with none there, before the next space
            # after it (a part then runs long), or not at all. Never inside a word: a piece with
            # no space in it may span any other cut.
            cut = text.rfind(" ", start + 1, end + 1)
            if cut < 0:
                cut = text.find(" ", end + 1)
            end = cut if cut > 0 else len(text)
        parts.append(np.array(sp.encode(text[start:end]), dtype=np.int32))
        start = end
    return np.concatenate(parts)


def _install_tokenizer(stage: Path, tokenizer_path, vocab_size, train_docs: Callable[[], Iterator[str]],
                       tiktoken_pattern: Optional[str] = None):
    """Put tokenizer.model into `stage`; return (tokenizer, meta fields). `tokenizer_path` is a
    SentencePiece .model, a tiktoken spec (`tiktoken:NAME` or FILE.tiktoken, with
    `tiktoken_pattern` for a file), or None to train pgolf's lossless BPE on `train_docs()`."""
    from pipeline.data.tiktoken_tokenizer import is_tiktoken_spec

    dest = stage / TOKENIZER_FILE
    if tokenizer_path is not None and is_tiktoken_spec(tokenizer_path):
        return _install_tiktoken(dest, tokenizer_path, vocab_size, tiktoken_pattern)
    if tiktoken_pattern is not None:
        raise UserError("--tiktoken-pattern goes with a tiktoken tokenizer (--tokenizer FILE.tiktoken); drop it or "
                        "pass one.")
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        sp = load_tokenizer(tokenizer_path)
        if vocab_size is not None:
            check_vocab(sp, vocab_size, tokenizer_path)
        shutil.copyfile(tokenizer_path, dest)
        trained = False
    else:
        train_tokenizer_docs(train_docs(), vocab_size or DEFAULT_VOCAB, dest)
        sp = load_tokenizer(dest)
        trained = True
    if sp.bos_id() != BOS_ID:
        raise UserError(
            f"tokenizer {tokenizer_path or dest} has bos id {sp.bos_id()}, but the shard format "
            f"expects {BOS_ID} (pad 0 / bos 1 / eos 2 / unk 3); use a tokenizer trained with those ids."
        )
    try:
        ByteTables.from_sentencepiece(sp)  # refuses a tokenizer whose bytes it cannot count
    except UserError as e:
        raise UserError(f"tokenizer {tokenizer_path or dest}: {e}") from None
    info = {
        "tokenizer_kind": "sentencepiece",
        "vocab_size": sp.vocab_size(),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(dest),
        "tokenizer_trained": trained,
        "lossless": is_lossless(sp),
    }
    return sp, info


def _install_tiktoken(dest: Path, spec, vocab_size, pattern):
    from pipeline.data.tiktoken_tokenizer import load_tiktoken, tiktoken_meta

    tok = load_tiktoken(spec, pattern)
    if vocab_size is not None and vocab_size != tok.vocab_size():
        raise UserError(f"{spec}: the tiktoken tokenizer has {tok.vocab_size()} shard ids (its ranks + 4 reserved) "
                        f"but --vocab is {vocab_size}; pass --vocab {tok.vocab_size()} or leave it out.")
    tok.check_exact(tok.byte_tables())
    atomic_write(dest, tok.ranks_file_bytes())
    info = {"vocab_size": tok.vocab_size(), "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": file_sha256(dest),
            "tokenizer_trained": False, "lossless": True, **tiktoken_meta(tok)}
    return tok, info


def _capped(texts: Iterator[str], cap: int) -> Iterator[str]:
    # Bounds the tokenizer's training text to about `cap` bytes (slicing by characters is
    # close enough: it is a memory guard, not a contract).
    used = 0
    for t in texts:
        if used >= cap:
            return
        t = t[: max(0, cap - used)]
        used += len(t.encode("utf-8"))
        yield t


# --- staging and committing the output directory ----------------------------------------------


def _read_meta(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(out_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build_into(out_dir: Path, source: Path, source_sha: str, build: Callable[[Path], dict],
                overwrite: bool = False) -> dict:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file; pass a directory to `--out`.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # Never replace a folder the user has: only an earlier prepare's output, and only when asked.
        if _read_meta(out_dir) is None:
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


class _ShardBuffer:
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


def _write_split(stage: Path, prefix: str, split: str, arrays, shard_size: int = SHARD_SIZE) -> tuple[int, int]:
    """Write a split's token arrays (each `[BOS] + tokens`) as shards; return (tokens, shards)."""
    writer = _ShardBuffer(stage, prefix, split, shard_size)
    for arr in arrays:
        writer.add(arr)
    paths = writer.close()
    return writer.n_tokens, len(paths)


def _meta(source: Path, kind: str, source_sha: str, split_rule: str, prefix: str, tok: dict,
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


# --- text -------------------------------------------------------------------------------------


def prepare_text(text_path, out_dir, tokenizer_path=None, vocab_size=None, prefix="data", overwrite=False) -> dict:
    """Prepare one UTF-8 text file (90/10 byte split). `vocab_size` None means 1024 when a
    tokenizer is trained, and "whatever it has" when `tokenizer_path` is given."""
    text_path = _require_file(text_path, "--text")
    data = text_path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{text_path} is not UTF-8 text (bad byte at offset {e.start}); convert it to "
            f"UTF-8 (e.g. `iconv -t utf-8`) and run prepare again."
        ) from None
    cut = text_split_point(data)
    train_text, val_text = data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
    if not train_text or not val_text:
        raise UserError(f"{text_path} is too small to split 90/10 ({len(data)} bytes); use a larger text.")
    source_sha = hashlib.sha256(data).hexdigest()

    def build(stage: Path) -> dict:
        sp, tok = _install_tokenizer(
            stage, tokenizer_path, vocab_size, lambda: _capped(iter([train_text]), TOKENIZER_MAX_TRAIN_BYTES)
        )
        chunkable = chunk_safe(sp)
        val = _encode(sp, val_text, chunkable)
        written = {"val": _write_split(stage, prefix, "val", [val])}
        roundtrip = sp.decode(val[1:].tolist()) == val_text
        del val
        written["train"] = _write_split(stage, prefix, "train", [_encode(sp, train_text, chunkable)])
        return _meta(text_path, "text", source_sha,
                     "first int(0.9*n) bytes train (cut moved forward to a UTF-8 character boundary), the rest "
                     "val; each split is one document [BOS]+tokens", prefix, tok, written,
                     {"train": cut, "val": len(data) - cut}, roundtrip, {"train": 1, "val": 1},
                     source_bytes=len(data), split_byte=cut)

    return _build_into(Path(out_dir), text_path, source_sha, build, overwrite)


# --- jsonl ------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[str]:
    """Each document's text, in file order; blank lines are skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: line is not UTF-8; convert the file to UTF-8.") from None
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e}); fix or remove that line.") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with a string \"text\" field; "
                    f"fix that line (one document per line, e.g. {{\"text\": \"...\"}})."
                )
            yield obj["text"]


def _batched(texts: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_jsonl(jsonl_path, out_dir, tokenizer_path=None, vocab_size=None, val_docs=None, prefix="data",
                  overwrite=False) -> dict:
    """Prepare a jsonl of {"text": ...} documents; the first `val_docs` documents are val."""
    jsonl_path = _require_file(jsonl_path, "--jsonl")
    n_docs = sum(1 for _ in _iter_jsonl(jsonl_path))  # also validates every line up front
    n_val = max(1, n_docs // 10) if val_docs is None else int(val_docs)
    if n_val < 1 or n_val >= n_docs:
        raise UserError(
            f"{jsonl_path} has {n_docs} documents, so val_docs={n_val} leaves no train or no val "
            f"documents; pass --val-docs between 1 and {max(1, n_docs - 1)} or add documents."
        )
    source_sha = file_sha256(jsonl_path)

    def docs(split: str) -> Iterator[str]:
        for i, text in enumerate(_iter_jsonl(jsonl_path)):
            if (i < n_val) == (split == "val"):
                yield text
            elif split == "val":
                return

    def build(stage: Path) -> dict:
        sp, tok = _install_tokenizer(
            stage, tokenizer_path, vocab_size, lambda: _capped(docs("train"), TOKENIZER_MAX_TRAIN_BYTES)
        )
        stats = {"val_raw_bytes": 0, "train_raw_bytes": 0, "roundtrip": True}

        def encoded(split: str) -> Iterator[np.ndarray]:
            for batch in _batched(docs(split), _ENCODE_BATCH_DOCS):
                ids = sp.encode(batch)
                for text, doc_ids in zip(batch, ids):
                    stats[f"{split}_raw_bytes"] += len(text.encode("utf-8"))
                    if split == "val" and stats["roundtrip"]:
                        stats["roundtrip"] = sp.decode(doc_ids) == text
                    yield np.array([BOS_ID] + doc_ids, dtype=np.int32)

        written = {split: _write_split(stage, prefix, split, encoded(split)) for split in ("val", "train")}
        return _meta(jsonl_path, "jsonl", source_sha,
                     f"first {n_val} documents val, the remaining {n_docs - n_val} train; each document is "
                     "[BOS]+tokens", prefix, tok, written,
                     {"train": stats["train_raw_bytes"], "val": stats["val_raw_bytes"]}, stats["roundtrip"],
                     {"train": n_docs - n_val, "val": n_val})

    return _build_into(Path(out_dir), jsonl_path, source_sha, build, overwrite)


# --- skip when up to date ---------------------------------------------------------------------


def _up_to_date(meta: Optional[dict], out_dir: Path, source: Path, tokenizer_path, vocab_size, val_docs,
                prefix) -> bool:
    if not meta or meta.get("source_sha256") != file_sha256(source) or meta.get("prefix") != prefix:
        return False
    if tokenizer_path is None:
        if not meta.get("tokenizer_trained") or meta.get("vocab_size") != (vocab_size or DEFAULT_VOCAB):
            return False
    else:
        if meta.get("tokenizer_sha256") != file_sha256(Path(tokenizer_path)):
            return False
        if vocab_size is not None and meta.get("vocab_size") != vocab_size:
            return False
    if val_docs is not None and meta.get("n_docs", {}).get("val") != val_docs:
        return False
    if not (out_dir / TOKENIZER_FILE).is_file():
        return False
    try:  # the shards must still be there and intact, not just the meta
        for split in ("train", "val"):
            if sum(read_header(p) for p in list_shards(out_dir, split)) != meta.get(f"{split}_tokens"):
                return False
    except UserError:
        return False
    return True


def ensure_prepared(
    out_dir,
    *,
    text_path=None,
    jsonl_path=None,
    tokenizer_path=None,
    vocab_size=None,
    val_docs=None,
    prefix="data",
) -> dict:
    """Prepare `out_dir` from exactly one of text_path / jsonl_path unless its meta.json already
    matches the source's sha256, the vocabulary (and tokenizer, split, prefix) and its shards are
    intact; an outdated earlier prepare there is replaced (for folders pgolf owns, such as the
    embedded corpus's cache). Returns the meta dict either way."""
    if (text_path is None) == (jsonl_path is None):
        raise ValueError("ensure_prepared needs exactly one of text_path or jsonl_path")
    out_dir = Path(out_dir)
    source = _require_file(text_path or jsonl_path, "--text" if text_path else "--jsonl")
    meta = _read_meta(out_dir)
    if _up_to_date(meta, out_dir, source, tokenizer_path, vocab_size, val_docs if jsonl_path else None, prefix):
        return meta
    if text_path is not None:
        return prepare_text(source, out_dir, tokenizer_path, vocab_size, prefix, overwrite=True)
    return prepare_jsonl(source, out_dir, tokenizer_path, vocab_size, val_docs, prefix, overwrite=True)
