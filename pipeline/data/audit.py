"""`pgolf data audit DIR`: is this data directory fit to be scored on?

    report = audit_data(Path("data/datasets/fineweb10B_sp1024"))
    for line in report.lines():
        print(line)                      # key=value lines, then one line per problem
    report.passed                        # False when report.problems is not empty

1. Leakage. A document is the tokens after one BOS up to the next BOS (or the end of its split;
   documents may straddle shards, as in the challenge's export). Every non-empty document of
   both splits is hashed (blake2b, 128 bits, of its uint16 token bytes); the validation digests
   are kept in memory (50,000 of them for FineWeb, a few MB) and the training shards are streamed
   through a memory map, one at a time. Every validation document whose tokens also occur as a
   training document counts (`overlap_docs`, `overlap_fraction`); the first few are listed with
   their places (shard:token offset) and first tokens. Any overlap is a problem: a model scored
   on documents it trained on reports a number that is not a held-out one. Empty documents
   (BOS right after BOS) stand for no text and are only counted.
2. The published validation set. For a directory that looks like one of the challenge's FineWeb
   exports (fineweb_* shards, a challenge tokenizer by sha256) the validation token count must
   be one the records scored (pg_mechanics.md §1.6; `pipeline.data.identity`).
3. Byte sidecars (§1.2, §2.7): when `*_val_bytes_*.bin` files are present, one per val shard
   with the same count, and 0 bytes at every BOS.
4. meta.json, when there is one: its recorded tokens, shards, documents and tokenizer hash
   against the directory (`identity.check_meta`).
5. Token ids: the largest id of each split (`val_max_token_id`, `train_max_token_id`) must be below
   the tokenizer's vocabulary size (`vocab_size`). Training checks the ids it reads too
   (pipeline.data.shards.check_token_ids), but only when it reaches them.

`pgolf submit` runs `audit_data` before any seed. Exit status of the command: 0 clean, 1 on
any problem, 2 for unusable input (a missing directory, a broken shard).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.data.identity import CHALLENGE_TOKENIZERS, check_meta, published_export_problem
from pipeline.data.shards import list_shards, load_byte_sidecar, load_shard, read_header
from pipeline.errors import UserError
from pipeline.fileio import file_sha256

BOS_ID = 1
DIGEST_BYTES = 16
HEAD_TOKENS = 8


@dataclass(frozen=True)
class Place:
    """Where a document starts: its BOS's shard file and token offset in that shard."""

    shard: str
    offset: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.offset}"


@dataclass(frozen=True)
class Overlap:
    """A validation document that also occurs in training."""

    val_doc: int  # index among the validation documents (0 = the first)
    val_place: Place
    train_place: Place  # the first training copy
    n_tokens: int
    head: tuple[int, ...]  # its first tokens (up to HEAD_TOKENS, within its first shard)


@dataclass
class AuditReport:
    data_dir: Path
    val_docs: int = 0
    train_docs: int = 0
    val_empty_docs: int = 0
    train_empty_docs: int = 0
    val_tokens: int = 0
    train_tokens: int = 0
    overlap_docs: int = 0
    examples: list[Overlap] = field(default_factory=list)
    vocab_size: Optional[int] = None  # the tokenizer's, when there is one
    max_token_id: dict = field(default_factory=dict)  # split -> (largest id, the first shard holding it)
    published: str = "unknown"
    sidecar: str = "absent"
    problems: list[str] = field(default_factory=list)

    @property
    def overlap_fraction(self) -> float:
        """Overlapping validation documents / validation documents (0.0 without any)."""
        return self.overlap_docs / self.val_docs if self.val_docs else 0.0

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"data_audit dir={self.data_dir}",
               f"val_docs={self.val_docs} val_tokens={self.val_tokens} val_empty_docs={self.val_empty_docs}",
               f"train_docs={self.train_docs} train_tokens={self.train_tokens} "
               f"train_empty_docs={self.train_empty_docs}",
               f"overlap_docs={self.overlap_docs} overlap_fraction={self.overlap_fraction:.6f}"]
        for ex in self.examples:
            out.append(f"overlap val_doc={ex.val_doc} val_at={ex.val_place} train_at={ex.train_place} "
                       f"tokens={ex.n_tokens} head={','.join(map(str, ex.head))}")
        out.append(f"vocab_size={self.vocab_size if self.vocab_size is not None else 'unknown'} " + " ".join(
            f"{split}_max_token_id={top}" for split, (top, _) in self.max_token_id.items()))
        out.append(f"published_export={self.published}")
        out.append(f"byte_sidecar={self.sidecar}")
        out.extend(f"problem: {p}" for p in self.problems)
        out.append(f"data_audit {'PASS' if self.passed else 'FAIL'}")
        return out


def _walk(paths: list[Path], visit: Callable[[bytes, int, int, int, int], None], problems: list[str],
          progress: Optional[Callable[[int, int], None]] = None) -> tuple[int, int, tuple[int, Optional[Path]]]:
    """Call visit(digest, n_tokens, doc_index, shard_index, offset) for each non-empty document
    of the split stored in `paths`, in stream order (doc_index counts empty documents too: it is
    the document's BOS's rank in the split). Returns (documents, empty documents, (largest token
    id, the first shard holding it))."""
    docs = empty = 0
    top: tuple[int, Optional[Path]] = (-1, None)
    hasher = None  # the open document's hash, its start (shard index, offset) and length
    start = (0, 0)
    length = 0

    def close() -> None:
        nonlocal docs, empty
        if length == 0:
            empty += 1
        else:
            visit(hasher.digest(), length, docs, *start)
        docs += 1

    for si, path in enumerate(paths):
        toks = load_shard(path)
        if toks.size and int(toks.max()) > top[0]:
            top = (int(toks.max()), path)
        bos = np.flatnonzero(toks == BOS_ID)
        first = int(bos[0]) if bos.size else toks.size
        if first:
            if hasher is None:
                problems.append(f"{path.name} starts with {first} tokens before any BOS: the split does not begin "
                                f"with a document's BOS, so it is not a [BOS]+tokens export; re-export it")
            else:  # the open document continues from the previous shard
                hasher.update(toks[:first])
                length += first
        ends = np.append(bos[1:], toks.size)
        for b, e in zip(bos.tolist(), ends.tolist()):
            if hasher is not None:
                close()
            hasher = hashlib.blake2b(toks[b + 1 : e], digest_size=DIGEST_BYTES)
            start, length = (si, b), e - b - 1
        if progress is not None:
            progress(si + 1, len(paths))
    if hasher is not None:
        close()
    return docs, empty, top


def _head(paths: list[Path], place: tuple[int, int], n: int) -> tuple[int, ...]:
    """The first `n` tokens of the document whose BOS is at `place` (those in its first shard)."""
    si, offset = place
    return tuple(int(t) for t in load_shard(paths[si])[offset + 1 : offset + 1 + n].tolist())


def audit_data(data_dir, tokenizer_path=None, *, eval_seq_len: int = 1024, max_examples: int = 5,
               progress: Optional[Callable[[str, int, int], None]] = None) -> AuditReport:
    """Audit the prepared or downloaded directory `data_dir` (module docstring). The tokenizer is
    `tokenizer_path`, default `data_dir/tokenizer.model`; without one the published-count check is
    reported as unknown. `progress(split, shards_done, shards_total)` follows the scan.

    Returns an AuditReport (problems listed, never raised); raises UserError when the directory
    or a shard is unusable (missing, bad header)."""
    data_dir = Path(data_dir)
    val_paths, train_paths = list_shards(data_dir, "val"), list_shards(data_dir, "train")
    report = AuditReport(data_dir)
    report.val_tokens = sum(read_header(p) for p in val_paths)  # every header checked before the long scan
    report.train_tokens = sum(read_header(p) for p in train_paths)

    val_docs: dict[bytes, list[tuple[int, int, int, int]]] = {}  # digest -> [(doc index, shard, offset, tokens)]

    def on_val(digest: bytes, n: int, index: int, si: int, offset: int) -> None:
        val_docs.setdefault(digest, []).append((index, si, offset, n))

    found: dict[bytes, tuple[int, int]] = {}  # digest of a val document -> its first training copy

    def on_train(digest: bytes, n: int, index: int, si: int, offset: int) -> None:
        if digest in val_docs and digest not in found:
            found[digest] = (si, offset)

    def split_progress(split: str):
        return None if progress is None else (lambda done, total: progress(split, done, total))

    report.val_docs, report.val_empty_docs, report.max_token_id["val"] = _walk(
        val_paths, on_val, report.problems, split_progress("val"))
    report.train_docs, report.train_empty_docs, report.max_token_id["train"] = _walk(
        train_paths, on_train, report.problems, split_progress("train"))
    hits = sorted((entry, digest) for digest in found for entry in val_docs[digest])
    report.overlap_docs = len(hits)
    for (index, si, offset, n), digest in hits[:max_examples]:
        tsi, toff = found[digest]
        report.examples.append(Overlap(index, Place(val_paths[si].name, offset), Place(train_paths[tsi].name, toff),
                                       n, _head(val_paths, (si, offset), min(n, HEAD_TOKENS))))
    if hits:
        (index, si, offset, _), digest = hits[0]
        tsi, toff = found[digest]
        report.problems.append(
            f"{report.overlap_docs} of {report.val_docs} validation documents ({report.overlap_fraction:.4%}) also "
            f"occur in training (first: val doc {index} at {Place(val_paths[si].name, offset)}, in training at "
            f"{Place(train_paths[tsi].name, toff)}); a score on this split is not held-out: rebuild the export so "
            f"no validation document is in training")

    _check_published(report, data_dir, tokenizer_path, train_paths, eval_seq_len)
    _check_sidecar(report, val_paths)
    tok = Path(tokenizer_path) if tokenizer_path else data_dir / "tokenizer.model"
    _check_token_ids(report, data_dir, tok)
    if (data_dir / "meta.json").exists():
        try:
            check_meta(data_dir, tok, train_paths, val_paths, train_docs=report.train_docs)
        except UserError as e:
            report.problems.append(str(e))
    return report


def tokenizer_vocab_size(data_dir: Path, tok: Path) -> Optional[int]:
    """The number of token ids `tok` (a SentencePiece .model or a tiktoken directory's ranks) gives
    the shards of `data_dir`; None without a tokenizer file. Raises UserError for an unreadable one."""
    from pipeline.data import tiktoken_file
    from pipeline.data.tokenizer import load_tokenizer

    if not tok.is_file():
        return None
    if tiktoken_file.tokenizer_kind(data_dir, tok) == tiktoken_file.KIND:
        return len(tiktoken_file.token_bytes_by_id(tok))
    return load_tokenizer(tok).vocab_size()


def _check_token_ids(report: AuditReport, data_dir: Path, tok: Path) -> None:
    """Every token id of both splits must be below the tokenizer's vocabulary size: a larger one is
    no token of it (a model with that vocab_size has no embedding row for it)."""
    try:
        report.vocab_size = tokenizer_vocab_size(data_dir, tok)
    except UserError as e:
        report.problems.append(str(e))
        return
    for split, (top, path) in report.max_token_id.items():
        if report.vocab_size is not None and top >= report.vocab_size:
            report.problems.append(f"{path.name} ({split}) holds token id {top}, but the tokenizer {tok.name} has "
                                   f"{report.vocab_size} ids: these shards were not made with it; re-export them")


def _check_published(report: AuditReport, data_dir: Path, tokenizer_path, train_paths: list[Path],
                     eval_seq_len: int) -> None:
    tok = Path(tokenizer_path) if tokenizer_path else data_dir / "tokenizer.model"
    if not tok.is_file():
        report.published = f"unknown (no tokenizer at {tok}, so the challenge's tokenizers cannot be recognised)"
        return
    sha = file_sha256(tok)
    known = CHALLENGE_TOKENIZERS.get(sha)
    if known is None or not all(p.name.startswith("fineweb_") for p in train_paths):
        report.published = "not_applicable (not a challenge FineWeb export: other shard names or tokenizer)"
        return
    name, counts = known
    problem = published_export_problem(train_paths, sha, report.val_tokens, eval_seq_len)
    if problem:
        report.published = f"mismatch ({name})"
        report.problems.append(problem)
    elif not counts:
        report.published = f"{name} (no published validation count to compare with)"
    else:
        report.published = (f"{name} match (val targets {report.val_tokens - 1:,}; records scored "
                            f"{' or '.join(f'{c:,}' for c in counts)} after truncation)")


def _check_sidecar(report: AuditReport, val_paths: list[Path]) -> None:
    try:
        sidecar = load_byte_sidecar(val_paths)
    except UserError as e:
        report.sidecar = "broken"
        report.problems.append(str(e))
        return
    if sidecar is None:
        report.sidecar = "absent"
        return
    val = np.concatenate([np.asarray(load_shard(p)) for p in val_paths])
    bad = np.flatnonzero((val == BOS_ID) & (sidecar != 0))
    if bad.size:
        report.sidecar = "broken"
        report.problems.append(f"the byte sidecar gives {int(sidecar[bad[0]])} bytes to val token {int(bad[0])}, a BOS "
                               f"(0 bytes): it does not belong to these shards; re-export both")
        return
    report.sidecar = f"present (one count per val token, {int(sidecar.sum(dtype=np.int64)):,} bytes)"
