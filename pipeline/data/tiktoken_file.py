"""tiktoken BPE files as pgolf stores them beside the shards, read without the tiktoken package.

A `.tiktoken` file (tiktoken's own format, `tiktoken.load.load_tiktoken_bpe`) has one line per
token: the token's bytes in base64, a space, its rank. That is all the byte tables need: a token
stands for exactly its bytes, so bpb stays the UTF-8 length of the text whatever the merges.

Shard ids. The challenge's shards put BOS at id 1 (pad 0 / bos 1 / eos 2 / unk 3, as in its
SentencePiece models and its byte260 tokenizer, which offsets its 256 bytes by 4:
`data/download_hf_docs_and_tokenize.py`). tiktoken ranks start at 0 with ordinary tokens, so
pgolf stores rank r as shard id r + ID_OFFSET (4) and keeps ids 0-3 for pad/bos/eos/unk: BOS is
1 for every tokenizer kind, and the loaders, the scorer and `pgolf data audit` need no case for
tiktoken. The encoding's own special tokens (`<|endoftext|>` ...) never reach a shard: documents
are encoded with `encode_ordinary`. A vocabulary of n ranks therefore needs n + 4 <= 65,536 ids
in the uint16 format (GPT-2's 50,256 ranks fit; cl100k_base's 100,256 do not and are refused
when the data is prepared, `pipeline.data.tiktoken_tokenizer`).

A prepared directory keeps the ranks file under the usual name `tokenizer.model` (every stage
and the submission script hash and pass that path) and says what it is in meta.json:
`"tokenizer_kind": "tiktoken"`. `tokenizer_kind` reads that, or a `.tiktoken` suffix.

Standard library only: the generated submission script bundles this module.

    kind = tokenizer_kind(data_dir, tok_path)      # "tiktoken" or "sentencepiece"
    pieces = token_bytes_by_id(tok_path)            # list[bytes | None], index = shard id
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Optional

from pipeline.errors import UserError

KIND = "tiktoken"
ID_OFFSET = 4  # shard id = rank + 4; ids 0..3 are pad / bos / eos / unk
BOS_ID = 1
SUFFIX = ".tiktoken"


def read_ranks(path) -> list[Optional[bytes]]:
    """The ranks of a `.tiktoken` file: a list indexed by rank holding each token's bytes (None
    for a rank the file skips). Raises UserError for a missing or malformed file, a repeated
    rank or a repeated token."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tiktoken BPE file {path} not found; pass an existing .tiktoken file.")
    by_rank: dict[int, bytes] = {}
    seen: set[bytes] = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise UserError(f"{path}:{lineno}: not a tiktoken BPE line (base64 token, space, rank): "
                                f"{line[:60]!r}; pass a .tiktoken file.") from None
            if rank < 0 or rank in by_rank or token in seen or not token:
                what = "an empty token" if not token else "a negative rank" if rank < 0 else "a repeated rank or token"
                raise UserError(f"{path}:{lineno}: {what} ({line[:60]!r}); the file is not a valid tiktoken BPE file.")
            by_rank[rank] = token
            seen.add(token)
    if not by_rank:
        raise UserError(f"{path} holds no tokens; pass a non-empty .tiktoken file.")
    ranks: list[Optional[bytes]] = [None] * (max(by_rank) + 1)
    for rank, token in by_rank.items():
        ranks[rank] = token
    return ranks


def token_bytes_by_id(path) -> list[Optional[bytes]]:
    """Each shard id's bytes (index = shard id): None for ids 0-3 (pad/bos/eos/unk) and for
    ranks the file skips, else the token's bytes. Raises UserError as `read_ranks` does."""
    return [None] * ID_OFFSET + read_ranks(path)


def tokenizer_kind(data_dir, tokenizer_path) -> str:
    """"tiktoken" when `tokenizer_path` ends in `.tiktoken`, or when it is the tokenizer file
    that `data_dir/meta.json` records with `"tokenizer_kind": "tiktoken"`; else "sentencepiece"."""
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.suffix == SUFFIX:
        return KIND
    meta_path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "sentencepiece"  # no meta.json (the challenge's downloads): SentencePiece models only
    if not isinstance(meta, dict) or meta.get("tokenizer_kind") != KIND:
        return "sentencepiece"
    own = Path(data_dir) / str(meta.get("tokenizer", "tokenizer.model"))
    try:
        same = own.resolve() == tokenizer_path.resolve()
    except OSError:
        same = False
    return KIND if same else "sentencepiece"
