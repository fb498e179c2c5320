"""Is this data directory what it says it is? Checks run on every load, before any compute.

    check_meta(data_dir, tokenizer_path, train_paths, val_tokens)   # meta.json vs the directory
    problem = published_export_problem(train_paths, tokenizer_sha256, val_tokens, eval_seq_len)

`pgolf data prepare` records in `meta.json` the tokenizer's sha256, the token and shard counts of
each split and the document counts. A directory whose files no longer match (a tokenizer copied in
from another preparation, a shard replaced or removed) would be scored with byte tables and token
counts that belong to other data; `check_meta` refuses it, naming the field, both values and the fix.
A directory without meta.json (the challenge's own downloads) has nothing to check here.

For the challenge's published FineWeb exports the validation token counts are known from the records'
logs (pg_mechanics.md §1.6); `published_export_problem` says when a directory that looks like one
(shards named `fineweb_*`, a known challenge tokenizer) has a different validation set: `pgolf run`
warns, `pgolf submit` refuses. Runtime-pure (stdlib, numpy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.shards import load_shard, read_header
from pipeline.errors import UserError
from pipeline.fileio import file_sha256

META_FILE = "meta.json"
BOS_ID = 1

# sha256 of the challenge's SentencePiece models (data/tokenizers/fineweb_{V}_bpe.model) -> the
# validation target counts its records logged (pg_mechanics.md §1.6). The logged count is the
# stream truncated to a multiple of the eval sequence length (1,024 or 2,048), so a directory
# matches when known <= n - 1 < known + 2048.
CHALLENGE_TOKENIZERS = {
    "849ea920119b5135ace5016137e82ab397738fc29d723d5f9a6b74c4e31af191": ("sp1024", (62_021_632, 63_779_840)),
    "ba9892fc3502b8c5f649e838bbf825cd1b929a092c010854c8784351151d2745": ("sp2048", ()),
    "d76de35070ed9feb76afe3a7efc3a1a0e91e9aa4978360ecdc7fbc22a9725512": ("sp4096", (45_508_608, 45_514_752)),
    "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516": ("sp8192", (40_540_160,)),
}
_TRUNCATION_SLACK = 2048


def read_meta(data_dir) -> Optional[dict]:
    path = Path(data_dir) / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); re-run `pgolf data prepare` for this directory.") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; re-run `pgolf data prepare` for this directory.")
    return meta


def check_meta(data_dir, tokenizer_path, train_paths, val_paths, train_docs: Optional[int] = None
               ) -> Optional[dict]:
    """Compare meta.json with the directory's actual files; UserError on the first mismatch.

    Token counts come from the shard headers, validation documents from its BOS tokens;
    `train_docs` (BOS tokens over the training shards) is checked when given, since counting it
    means reading every training shard. Returns the meta dict (None without one)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta is None:
        return None
    where = data_dir / META_FILE
    fix = (f"the directory was changed after `pgolf data prepare` wrote it: re-run `pgolf data prepare --out "
           f"{data_dir}`, or restore the original files")
    actual = {
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "train_tokens": sum(read_header(p) for p in train_paths),
        "val_tokens": sum(read_header(p) for p in val_paths),
        "train_shards": len(train_paths),
        "val_shards": len(val_paths),
        "val_docs": sum(int(np.count_nonzero(load_shard(p) == BOS_ID)) for p in val_paths),
    }
    if train_docs is not None:
        actual["train_docs"] = int(train_docs)
    recorded = dict(meta)
    docs = meta.get("n_docs") if isinstance(meta.get("n_docs"), dict) else {}
    recorded["train_docs"], recorded["val_docs"] = docs.get("train"), docs.get("val")
    for key, value in actual.items():
        want = recorded.get(key)
        if want is None:
            continue  # an older meta.json without this field
        if want != value:
            what = f"{Path(tokenizer_path).name}'s sha256" if key == "tokenizer_sha256" else key
            raise UserError(f"{where} records {key}={want}, but the directory has {what}={value}; {fix}.")
    return meta


def published_export_problem(train_paths, tokenizer_sha256: str, val_tokens: int, eval_seq_len: int = 1024
                             ) -> Optional[str]:
    """A sentence when the directory looks like one of the challenge's FineWeb exports (shards named
    `fineweb_*`, a known challenge tokenizer) but its validation set differs from every published
    count of that tokenizer; None when it matches or is not such an export."""
    known = CHALLENGE_TOKENIZERS.get(tokenizer_sha256)
    if known is None or not train_paths or not all(Path(p).name.startswith("fineweb_") for p in train_paths):
        return None
    name, counts = known
    if not counts:
        return None  # no published count to compare with
    targets = val_tokens - 1
    if any(c <= targets < c + _TRUNCATION_SLACK for c in counts):
        return None
    return (f"this looks like the challenge's {name} FineWeb export, but its validation split has {val_tokens:,} "
            f"tokens, while the records scored {' or '.join(f'{c:,}' for c in counts)} targets "
            f"(pg_mechanics.md §1.6): it is not the fixed validation set; re-download it "
            f"(eval.seq_len {eval_seq_len} truncation allowed for)")
