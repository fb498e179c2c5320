"""tiktoken as a second tokenizer family for `pgolf data prepare`.

    tok = load_tiktoken("tiktoken:gpt2")                       # by name, from the user's tiktoken cache
    tok = load_tiktoken("my_bpe.tiktoken", pattern=r"...")      # a BPE file and its split regex
    ids = tok.encode(["doc one", "doc two"])                    # shard ids (rank + 4), per document
    tables = tok.byte_tables()                                  # exact: bpb stays tokenizer-independent

An encoding given by name is built by tiktoken's own constructor (its `tiktoken_ext` plugins), but
its BPE file must already be in the user's tiktoken cache (`TIKTOKEN_CACHE_DIR`, else
`DATA_GYM_CACHE_DIR`, else `<tmp>/data-gym-cache`): tiktoken has no offline switch, so pgolf
swaps tiktoken's network reader for one that raises, and a missing file is a UserError naming
its URL and the cache path, never a download. A `.tiktoken` file given by path holds only the
ranks, not the regex that splits text before the merges, so `pattern` is required then: a regex,
or the name of an encoding whose regex to use (read from its tiktoken constructor, which is then
handed the given file instead of fetching its own, so no cache is needed either).

Shard ids are ranks + 4 (ids 0-3 are pad/bos/eos/unk, BOS 1, as in the challenge's shards;
`pipeline.data.tiktoken_file`), so a vocabulary needs at most 65,532 ranks to fit the uint16
format: larger ones (cl100k_base, o200k_base) are refused with the fix.

The encoder is tiktoken; the data directory keeps the ranks file (`tokenizer.model`) and the
pattern (meta.json), and the scorer reads the ranks without tiktoken. Not bundled into the
submission script (it imports tiktoken).
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import tiktoken
import tiktoken.load
import tiktoken.registry

from eval.byte_tables import ByteTables
from pipeline.data.shards import MAX_TOKEN
from pipeline.data.tiktoken_file import BOS_ID, ID_OFFSET, KIND, SUFFIX, read_ranks
from pipeline.errors import UserError

NAME_PREFIX = "tiktoken:"
# Probe texts for the exactness check: spaces and tabs of every run length, CR/LF, characters
# outside any small vocabulary (byte-level pieces), emoji, CJK, and tiktoken's special-token text
# (encode_ordinary must treat it as plain text).
_PROBES = (
    "the cat of the dog and to in is was. his her not but it an",
    " lead\t tab  two   three\n\n\r\nend ",
    "caf\u00e9 na\u00efve \ufb01ne \uff26ull x\u00b2 a\u00a0b \u20ac 12.5% \U0001f600 \u6f22\u5b57 trail  \n",
    "<|endoftext|> is text here",
)


def is_tiktoken_spec(spec) -> bool:
    """True for `tiktoken:NAME` or a path ending in `.tiktoken`."""
    s = str(spec)
    return s.startswith(NAME_PREFIX) or s.endswith(SUFFIX)


class TiktokenTokenizer:
    """What `prepare` needs of a tokenizer, over a tiktoken Encoding with ids shifted by 4."""

    kind = KIND

    def __init__(self, encoding: "tiktoken.Encoding", ranks: list[Optional[bytes]], source: str, pattern: str):
        self.encoding, self.ranks, self.source, self.pattern = encoding, ranks, source, pattern

    def vocab_size(self) -> int:
        """Shard vocabulary: the ranks plus the 4 reserved ids."""
        return len(self.ranks) + ID_OFFSET

    def bos_id(self) -> int:
        return BOS_ID

    def encode(self, text):
        """Shard ids of one text (list[int]) or of each text of a list (list[list[int]])."""
        if isinstance(text, str):
            return [r + ID_OFFSET for r in self.encoding.encode_ordinary(text)]
        return [[r + ID_OFFSET for r in ids] for ids in self.encoding.encode_ordinary_batch(list(text))]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the shard ids stand for (reserved ids stand for none)."""
        return b"".join(self.ranks[i - ID_OFFSET] or b"" for i in ids if i >= ID_OFFSET)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def ranks_file_bytes(self) -> bytes:
        """The ranks in tiktoken's `.tiktoken` format (what the data directory keeps)."""
        return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
                        for rank, tok in enumerate(self.ranks) if tok is not None)

    def byte_tables(self, vocab_size: int = 0) -> ByteTables:
        return ByteTables.from_token_bytes([None] * ID_OFFSET + self.ranks, vocab_size)

    def check_exact(self, tables: ByteTables) -> None:
        """UserError unless the tables count `[BOS] + encode(text)` as len(text.encode()) for
        each probe text and every text decodes back (the encoding is byte-level and lossless)."""
        import torch

        for text in _PROBES:
            ids = [BOS_ID] + self.encode(text)
            t = torch.tensor(ids, dtype=torch.int64)
            got = int(tables.target_bytes(t[:-1], t[1:]).sum())
            if got != len(text.encode("utf-8")) or self.decode_bytes(ids) != text.encode("utf-8"):
                raise UserError(f"tiktoken encoding {self.source}: {text!r} does not round-trip through its "
                                f"tokens (counted {got} bytes of {len(text.encode('utf-8'))}); the BPE file or "
                                f"pattern is broken, pass the right one.")


def _check_width(n_ranks: int, source: str) -> None:
    if n_ranks + ID_OFFSET > MAX_TOKEN + 1:
        raise UserError(
            f"tiktoken encoding {source} has {n_ranks:,} tokens; with the 4 reserved ids (pad/bos/eos/unk) its "
            f"shard ids reach {n_ranks + ID_OFFSET - 1:,}, past the challenge shard format's uint16 limit of "
            f"{MAX_TOKEN:,}. Use an encoding with at most {MAX_TOKEN + 1 - ID_OFFSET:,} tokens (gpt2, r50k_base, "
            f"p50k_base) or a SentencePiece model.")


def _cache_dir() -> str:
    # tiktoken.load.read_file_cached's own rule, spelled out to tell the user where to put files.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


class _NotCached(Exception):
    def __init__(self, blobpath: str):
        super().__init__(blobpath)
        self.blobpath = blobpath


@contextmanager
def _offline(serve: Optional[bytes] = None):
    """Run a tiktoken constructor without network. tiktoken reads a BPE file through
    `tiktoken.load.read_file` only when its cache lacks it, so that reader is swapped for one
    that raises. With `serve`, the cached reader `read_file_cached` is swapped instead to hand
    every request those bytes (unchecked and never written to the cache): used only to read a
    constructor's split pattern, the ranks it returns then are discarded."""
    def refuse(blobpath: str) -> bytes:
        raise _NotCached(blobpath)

    def served(blobpath: str, expected_hash=None) -> bytes:
        return serve

    name, replacement = ("read_file", refuse) if serve is None else ("read_file_cached", served)
    saved = getattr(tiktoken.load, name)
    setattr(tiktoken.load, name, replacement)
    try:
        yield
    finally:
        setattr(tiktoken.load, name, saved)


def _check_name(name: str) -> None:
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise UserError(f"unknown tiktoken encoding {name!r}; known: {', '.join(sorted(names))} (or pass a "
                        f".tiktoken file with --tiktoken-pattern).")


def _constructor_args(name: str) -> dict:
    """tiktoken's constructor arguments for encoding `name`, from the user's cache only."""
    _check_name(name)
    try:
        with _offline():
            return tiktoken.registry.ENCODING_CONSTRUCTORS[name]()
    except _NotCached as e:
        cache = _cache_dir() or "(caching disabled: TIKTOKEN_CACHE_DIR is empty)"
        key = hashlib.sha1(e.blobpath.encode()).hexdigest()
        by_path = (f", or save that URL as a file and pass --tokenizer FILE.tiktoken --tiktoken-pattern {name}"
                   if e.blobpath.endswith(SUFFIX) else "")
        raise UserError(
            f"tiktoken encoding {name!r} needs {e.blobpath}, which is not in the tiktoken cache "
            f"({os.path.join(cache, key) if _cache_dir() else cache}); pgolf never downloads it. On a machine with "
            f"internet run `python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` and copy its cache folder "
            f"here (set TIKTOKEN_CACHE_DIR to it){by_path}."
        ) from None


def _pattern_of(name: str, ranks_file: bytes) -> str:
    """Encoding `name`'s split regex, without its BPE file: its constructor is handed
    `ranks_file` (a valid .tiktoken text) in place of every file it reads."""
    _check_name(name)
    try:
        with _offline(serve=ranks_file):
            return tiktoken.registry.ENCODING_CONSTRUCTORS[name]()["pat_str"]
    except Exception as e:  # noqa: BLE001 - a constructor that reads another file format (gpt2's)
        raise UserError(f"cannot take the split pattern of tiktoken encoding {name!r} ({type(e).__name__}: {e}); "
                        f"name one built from a .tiktoken file (r50k_base has gpt2's pattern) or pass the regex."
                        ) from None


def load_tiktoken(spec, pattern: Optional[str] = None) -> TiktokenTokenizer:
    """The tokenizer for `spec`: `tiktoken:NAME` (from the user's tiktoken cache) or a path to a
    `.tiktoken` file, which needs `pattern` (a regex, or `tiktoken:NAME` / NAME of an encoding
    in the cache whose split pattern to use). Raises UserError for a missing or malformed BPE
    file, an unknown name, a missing pattern, or a vocabulary too wide for uint16 shards."""
    spec = str(spec)
    if spec.startswith(NAME_PREFIX):
        name = spec[len(NAME_PREFIX):]
        args = _constructor_args(name)
        ranks_dict = args["mergeable_ranks"]
        ranks: list[Optional[bytes]] = [None] * (max(ranks_dict.values()) + 1)
        for tok, rank in ranks_dict.items():
            ranks[rank] = tok
        _check_width(len(ranks), spec)
        if pattern is not None:
            raise UserError(f"--tiktoken-pattern is only for a .tiktoken file; {spec} brings its own pattern.")
        pat_str, source = args["pat_str"], name
    else:
        path = Path(spec)
        ranks = read_ranks(path)
        _check_width(len(ranks), str(path))
        if not pattern:
            raise UserError(
                f"{path} holds tiktoken ranks but not the regex that splits text before the merges; pass "
                f"--tiktoken-pattern REGEX, or --tiktoken-pattern NAME to use encoding NAME's (e.g. r50k_base), "
                f"or use --tokenizer tiktoken:NAME for an encoding in your tiktoken cache.")
        borrowed = pattern[len(NAME_PREFIX):] if pattern.startswith(NAME_PREFIX) else pattern
        if pattern.startswith(NAME_PREFIX) or borrowed in tiktoken.list_encoding_names():
            pat_str = _pattern_of(borrowed, path.read_bytes())
        else:
            pat_str = pattern
        source = path.name
    mergeable = {tok: rank for rank, tok in enumerate(ranks) if tok is not None}
    missing = [b for b in range(256) if bytes([b]) not in mergeable]
    if missing:
        # tiktoken panics on text whose bytes have no token; say which ones instead.
        raise UserError(f"tiktoken encoding {source} has no token for the single byte(s) "
                        f"{', '.join(f'0x{b:02x}' for b in missing[:8])}{' ...' if len(missing) > 8 else ''}, so some "
                        f"text cannot be encoded; use a byte-level BPE file (all 256 single bytes present).")
    try:
        encoding = tiktoken.Encoding(name=f"pgolf:{source}", pat_str=pat_str, mergeable_ranks=mergeable,
                                     special_tokens={})
    except ValueError as e:  # tiktoken reports a bad regex as ValueError
        raise UserError(f"tiktoken encoding {source}: cannot build it with pattern {pattern!r} ({e}); pass a valid "
                        f"--tiktoken-pattern.") from None
    return TiktokenTokenizer(encoding, ranks, source, pat_str)


def tiktoken_meta(tok: TiktokenTokenizer) -> dict:
    """meta.json fields that say what the directory's tokenizer file is."""
    return {"tokenizer_kind": KIND, "tiktoken_source": tok.source, "tiktoken_pattern": tok.pattern,
            "token_id_offset": ID_OFFSET}
