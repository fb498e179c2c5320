"""`pgolf data prepare`: turn a text or jsonl file into challenge-format shards + tokenizer.

Split rules:
* text  - nanoGPT shakespeare_char's: the first int(0.9 * n) *bytes* train, the rest val (the
          cut moves forward to the next UTF-8 character boundary). Each split is one document,
          `[BOS] + encode(split_text)`.
* jsonl - the challenge exporter's: one JSON object with a "text" field per line; the first
          `val_docs` documents (default max(1, 10%)) are val, the rest train; each document is
          `[BOS] + encode(text)`.

`prepare_jsonl(..., challenge=True)` reproduces the challenge's own export
(`data/download_hf_docs_and_tokenize.py`, pg_mechanics.md §1.1, §1.5) with a given tokenizer:
the first 50,000 documents (or the `docs_val` of the challenge's `<stem>.source_manifest.json`
beside the file) are val, the rest train, BOS before each document, no EOS, `fineweb_` shards
of 10^8 tokens; the same document list and tokenizer give byte-identical shards.

Without a tokenizer, a lossless BPE (see `tokenizer`) is trained on the *training split only*
(so nothing about val leaks into it); with one (a SentencePiece .model, or a tiktoken encoding:
`tiktoken:NAME` or FILE.tiktoken, see `tiktoken_tokenizer`), it is checked and copied in. Either
way the byte tables are built once (`eval.byte_tables`), so a tokenizer whose bytes cannot be counted
exactly is refused here, before any shard is written. The output directory holds
`{prefix}_{train,val}_NNNNNN.bin`, `tokenizer.model` and `meta.json`. A text longer than
`_ENCODE_CHUNK_CHARS` is encoded in parts only when that gives the whole text's tokens
(`tokenizer.chunk_safe`).

CaseOps (`caseops=True`, `--caseops`; pipeline.data.caseops, pg_mechanics.md §2.7): every document
is tokenized as its lossless case transform (the tokenizer is trained on transformed training text
with the four markers as user-defined pieces, or a given one must keep them as single pieces), and
each val shard gets a byte sidecar `{prefix}_val_bytes_NNNNNN.bin` of the same length: each
token's raw UTF-8 bytes (markers and BOS 0), which `load_data` then counts instead of the tables.
meta.json adds `text_transform` and `val_sidecar_bytes`; `val_raw_bytes` stays the raw text's.

Atomicity: everything is built in a hidden sibling directory and renamed into place, so an
interrupted prepare leaves the old output (or nothing) behind; only a crash in the instant
between the two renames of a replacement leaves the old output in a hidden `.NAME.old-*`
sibling instead. The jsonl path streams the file (a few passes, nothing held in memory but one
uint16 shard buffer, a batch of documents and the tokenizer's capped training text), so peak
memory does not grow with the input (`benchmarks/memory_flat.py` measures it). An existing output
directory is replaced only if it is an earlier prepare's output and `overwrite` is given
(`--overwrite`); any other non-empty directory is refused with a UserError, so a typo in `--out`
cannot delete unrelated files or a dataset (`prepare_output`).

Use:
    meta = prepare_text(Path("input.txt"), Path("data/shakes_sp1024"), vocab_size=1024)
    meta = prepare_jsonl(Path("docs.jsonl"), Path("data/docs"), val_docs=1000)
    meta = prepare_jsonl(Path("docs_selected.jsonl"), Path("data/fw"), tokenizer_path=Path("fineweb_1024_bpe.model"),
                         challenge=True)
    meta = ensure_prepared(out_dir, text_path=Path("input.txt"))   # no-op when up to date
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from eval.byte_tables import ByteTables
from pipeline.data import caseops as caseops_mod
from pipeline.data import shards
from pipeline.data.prepare_output import ShardBuffer, build_into, make_meta, read_meta, write_split
from pipeline.data.shards import list_shards, read_header
from pipeline.data.tiktoken_tokenizer import is_tiktoken_spec
from pipeline.data.tokenizer import (
    BOS_ID,
    check_vocab,
    chunk_safe,
    is_lossless,
    load_tokenizer,
    train_tokenizer_docs,
)
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, file_sha256

DEFAULT_VOCAB = 1024
TOKENIZER_FILE = "tokenizer.model"
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
                       tiktoken_pattern: Optional[str] = None, caseops: bool = False):
    """Put tokenizer.model into `stage`; return (tokenizer, meta fields). `tokenizer_path` is a
    SentencePiece .model, a tiktoken spec (`tiktoken:NAME` or FILE.tiktoken, with
    `tiktoken_pattern` for a file), or None to train pgolf's lossless BPE on `train_docs()`.
    With `caseops` the markers must be (or are trained as) single pieces (pipeline.data.caseops)."""
    dest = stage / TOKENIZER_FILE
    if tokenizer_path is not None and is_tiktoken_spec(tokenizer_path):
        if caseops:
            raise UserError("--caseops needs a SentencePiece tokenizer (its markers are user-defined pieces); pass a "
                            ".model or leave out --tokenizer to train one.")
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
        train_tokenizer_docs(train_docs(), vocab_size or DEFAULT_VOCAB, dest,
                             user_defined_symbols=caseops_mod.MARKERS if caseops else ())
        sp = load_tokenizer(dest)
        trained = True
    if caseops:
        caseops_mod.check_tokenizer(sp, tokenizer_path or dest)
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


# --- text -------------------------------------------------------------------------------------


def prepare_text(text_path, out_dir, tokenizer_path=None, vocab_size=None, prefix="data", overwrite=False, *,
                 tiktoken_pattern: Optional[str] = None, shard_size: Optional[int] = None,
                 caseops: bool = False) -> dict:
    """Prepare one UTF-8 text file (90/10 byte split). `vocab_size` None means 1024 when a
    tokenizer is trained, and "whatever it has" when `tokenizer_path` is given (a .model or a
    tiktoken spec, see `_install_tokenizer`). `caseops`: tokenize the CaseOps transform of each
    split and write the val byte sidecar (`_caseops_sidecar`). Returns the meta.json dict; raises
    UserError."""
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
    if caseops:  # the raw byte counts (cut, len(data)) stay those of the text itself
        train_text, val_text = caseops_mod.encode(train_text), caseops_mod.encode(val_text)

    def build(stage: Path) -> dict:
        sp, tok = _install_tokenizer(
            stage, tokenizer_path, vocab_size, lambda: _capped(iter([train_text]), TOKENIZER_MAX_TRAIN_BYTES),
            tiktoken_pattern, caseops)
        # tiktoken encodes a long text in linear time and memory itself; only SentencePiece is chunked
        chunkable = tok["tokenizer_kind"] == "sentencepiece" and chunk_safe(sp)
        val = _encode(sp, val_text, chunkable)
        written = {"val": write_split(stage, prefix, "val", [val], shard_size or shards.SHARD_SIZE)}
        extra = {}
        if caseops:
            side, roundtrip = _caseops_sidecar(caseops_mod.PieceBytes(sp), val[1:], val_text)
            write_split(stage, prefix, "val_bytes", [side], shard_size or shards.SHARD_SIZE)
            extra = {"text_transform": caseops_mod.NAME, "val_sidecar_bytes": int(side.sum())}
        else:
            roundtrip = sp.decode(val[1:].tolist()) == val_text
        del val
        written["train"] = write_split(stage, prefix, "train", [_encode(sp, train_text, chunkable)],
                                        shard_size or shards.SHARD_SIZE)
        return make_meta(text_path, "text", source_sha,
                     "first int(0.9*n) bytes train (cut moved forward to a UTF-8 character boundary), the rest "
                     "val; each split is one document [BOS]+tokens", prefix, tok, written,
                     {"train": cut, "val": len(data) - cut}, roundtrip, {"train": 1, "val": 1},
                     source_bytes=len(data), split_byte=cut, **extra)

    return build_into(Path(out_dir), text_path, source_sha, build, overwrite)


# --- jsonl ------------------------------------------------------------------------------------


def iter_jsonl(path: Path) -> Iterator[str]:
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


def _docs_sidecar(jsonl_path: Path) -> Optional[dict]:
    """The challenge's `<stem>.source_manifest.json` beside the docs (num_docs, docs_val, ...), or None."""
    path = jsonl_path.with_name(f"{jsonl_path.stem}.source_manifest.json")
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); restore it or remove it.") from None
    if not isinstance(side, dict):
        raise UserError(f"{path} is not a JSON object; restore it or remove it.")
    return side


def prepare_jsonl(jsonl_path, out_dir, tokenizer_path=None, vocab_size=None, val_docs=None, prefix="data",
                  overwrite=False, *, challenge: bool = False, tiktoken_pattern: Optional[str] = None,
                  shard_size: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                  caseops: bool = False) -> dict:
    """Prepare a jsonl of {"text": ...} documents; the first `val_docs` documents are val
    (default 10%), each document `[BOS] + tokens`, streamed: memory holds one shard buffer.

    `challenge=True` reproduces the challenge's export (pg_mechanics.md §1.1, §1.5): shards
    `fineweb_{val,train}_NNNNNN.bin` of `shard_size` (10^8) tokens, `val_docs` defaulting to
    the `docs_val` of a `<stem>.source_manifest.json` beside the file, else 50,000, and the given
    tokenizer (required). `progress(done_docs, total_docs)` is called as documents are written.
    `caseops`: each document is tokenized as its CaseOps transform, and the val split gets its
    byte sidecar `{prefix}_val_bytes_NNNNNN.bin` beside each val shard (prepare_caseops_data.py's
    layout). Returns the meta.json dict; raises UserError for bad input."""
    jsonl_path = _require_file(jsonl_path, "--jsonl")
    shard_size = shard_size or shards.SHARD_SIZE
    n_docs = sum(1 for _ in iter_jsonl(jsonl_path))  # also validates every line up front
    side = None
    if challenge:
        if tokenizer_path is None:
            raise UserError("--challenge reproduces the challenge's export with its tokenizer: pass --tokenizer "
                            "M.model (the published fineweb_<V>_bpe.model, or one from `pgolf tokenizer train "
                            "--style challenge`).")
        prefix = CHALLENGE_PREFIX
        side = _docs_sidecar(jsonl_path)
        if side is not None and side.get("num_docs") is not None and int(side["num_docs"]) != n_docs:
            raise UserError(f"{jsonl_path} has {n_docs} documents but its source manifest records num_docs="
                            f"{side['num_docs']}: it is not the published document list; re-download it.")
        if val_docs is None:
            val_docs = int(side["docs_val"]) if side and side.get("docs_val") is not None else CHALLENGE_VAL_DOCS
    n_val = max(1, n_docs // 10) if val_docs is None else int(val_docs)
    if n_val < 1 or n_val >= n_docs:
        raise UserError(
            f"{jsonl_path} has {n_docs} documents, so val_docs={n_val} leaves no train or no val "
            f"documents; pass --val-docs between 1 and {max(1, n_docs - 1)} or add documents."
        )
    source_sha = file_sha256(jsonl_path)

    def docs(split: str) -> Iterator[str]:
        for i, text in enumerate(iter_jsonl(jsonl_path)):
            if (i < n_val) == (split == "val"):
                yield text
            elif split == "val":
                return

    def build(stage: Path) -> dict:
        transform = caseops_mod.encode if caseops else None
        sp, tok = _install_tokenizer(
            stage, tokenizer_path, vocab_size,
            lambda: _capped(map(transform, docs("train")) if caseops else docs("train"), TOKENIZER_MAX_TRAIN_BYTES),
            tiktoken_pattern, caseops)
        stats = {"val_raw_bytes": 0, "train_raw_bytes": 0, "roundtrip": True, "done": 0, "sidecar_bytes": 0}
        pieces = caseops_mod.PieceBytes(sp) if caseops else None
        side_buf = ShardBuffer(stage, prefix, "val_bytes", shard_size) if caseops else None

        def encoded(split: str) -> Iterator[np.ndarray]:
            for batch in _batched(docs(split), _ENCODE_BATCH_DOCS):
                texts = [transform(t) for t in batch] if caseops else batch
                ids = sp.encode(texts)
                for text, ttext, doc_ids in zip(batch, texts, ids):
                    stats[f"{split}_raw_bytes"] += len(text.encode("utf-8"))
                    if split == "val" and caseops:
                        counts, exact = _caseops_sidecar(pieces, doc_ids, ttext)
                        side_buf.add(counts)  # parallel to the val shards: the same sizes, the same cuts
                        stats["sidecar_bytes"] += int(counts.sum())
                        stats["roundtrip"] = stats["roundtrip"] and exact
                    elif split == "val" and stats["roundtrip"]:
                        stats["roundtrip"] = sp.decode(doc_ids) == text
                    doc = np.empty(len(doc_ids) + 1, dtype=np.int32)
                    doc[0] = BOS_ID
                    doc[1:] = doc_ids
                    yield doc
                stats["done"] += len(batch)
                if progress is not None:
                    progress(stats["done"], n_docs)

        written = {split: write_split(stage, prefix, split, encoded(split), shard_size) for split in ("val", "train")}
        extra = {"shard_size": shard_size, "challenge_export": challenge}
        if caseops:
            side_buf.close()
            if side_buf.n_tokens != written["val"][0]:
                raise RuntimeError("the byte sidecar and the val shards differ in length")  # a bug, not input
            extra.update(text_transform=caseops_mod.NAME, val_sidecar_bytes=stats["sidecar_bytes"])
        rule = (f"the challenge's export (data/download_hf_docs_and_tokenize.py): first {n_val} documents val, the "
                f"remaining {n_docs - n_val} train, each [BOS]+tokens, {shard_size}-token shards" if challenge else
                f"first {n_val} documents val, the remaining {n_docs - n_val} train; each document is [BOS]+tokens")
        if side is not None:
            extra["docs_source_manifest"] = {k: side.get(k) for k in ("num_docs", "docs_val", "shuffle_seed",
                                                                      "docs_sha256")}
        return make_meta(jsonl_path, "jsonl", source_sha, rule, prefix, tok, written,
                     {"train": stats["train_raw_bytes"], "val": stats["val_raw_bytes"]}, stats["roundtrip"],
                     {"train": n_docs - n_val, "val": n_val}, **extra)

    return build_into(Path(out_dir), jsonl_path, source_sha, build, overwrite)


def _caseops_sidecar(pieces, ids, transformed: str) -> tuple[np.ndarray, bool]:
    """The byte sidecar of one document whose tokens (after its BOS) are `ids` = sp.encode(transformed):
    [0 for the BOS] + raw bytes per token (pg_mechanics.md §2.7), and whether the tokens decode to
    exactly `transformed` (then the counts sum to the raw text's UTF-8 length: the transform is a
    bijection)."""
    counts, exact = pieces.raw_bytes(ids, transformed)
    return np.concatenate([np.zeros(1, dtype=np.uint16), counts]), exact


# --- skip when up to date ---------------------------------------------------------------------


def _up_to_date(meta: Optional[dict], out_dir: Path, source: Path, tokenizer_path, vocab_size, val_docs,
                prefix) -> bool:
    if not meta or meta.get("source_sha256") != file_sha256(source) or meta.get("prefix") != prefix:
        return False
    if meta.get("text_transform", caseops_mod.IDENTITY) != caseops_mod.IDENTITY:
        return False  # ensure_prepared never transforms
    if tokenizer_path is None:
        if not meta.get("tokenizer_trained") or meta.get("vocab_size") != (vocab_size or DEFAULT_VOCAB):
            return False
    else:
        if is_tiktoken_spec(tokenizer_path):
            return False  # the directory keeps the ranks re-written, not the given file: rebuild
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
    meta = read_meta(out_dir)
    if _up_to_date(meta, out_dir, source, tokenizer_path, vocab_size, val_docs if jsonl_path else None, prefix):
        return meta
    if text_path is not None:
        return prepare_text(source, out_dir, tokenizer_path, vocab_size, prefix, overwrite=True)
    return prepare_jsonl(source, out_dir, tokenizer_path, vocab_size, val_docs, prefix, overwrite=True)
