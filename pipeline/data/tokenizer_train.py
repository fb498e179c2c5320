"""`pgolf tokenizer train`: a SentencePiece BPE with the challenge's settings or pgolf's lossless ones.

    pgolf tokenizer train --input docs.jsonl --vocab 1024 --style challenge --out fineweb_1024_bpe.model
    pgolf tokenizer train --input input.txt --vocab 1024 --style lossless --out tok.model

Styles:
* `challenge` - the challenge exporter's `build_sentencepiece_tokenizer`
  (data/download_hf_docs_and_tokenize.py, pg_mechanics.md §1.3): BPE, character_coverage 0.999,
  byte_fallback, split_digits, the nmt_nfkc normalizer, no dummy prefix, ids pad 0 / bos 1 /
  eos 2 / unk 3, hard_vocab_limit False, every other setting SentencePiece's default (so, as
  there, a sentence longer than max_sentence_length, 4,192 bytes, is skipped). Each document is
  one sentence, with NULs made spaces and outer whitespace stripped, empty ones dropped; the
  first `max_docs` documents only, as its `tokenizer_train_docs` (the sp4096/sp8192 builds used
  5,000,000). nmt_nfkc rewrites text (newlines, runs of spaces, NFKC), so bpb is counted on the
  normalized text, as the challenge does.
* `lossless` - pgolf's (`pipeline.data.tokenizer`): identity normalization, byte fallback,
  every raw byte scored.

Input: a `.jsonl` file (one {"text": ...} object per line, one document each) or a UTF-8 text
file (challenge style: each non-empty line a document; lossless style: the whole text). Either
way the model must count bytes exactly (`eval.byte_tables`), or it is not written.
Not bundled into the submission script.
"""

from __future__ import annotations

import io
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from eval.byte_tables import ByteTables
from pipeline.data.prepare import iter_jsonl
from pipeline.data.tokenizer import BOS_ID, is_lossless, train_tokenizer_docs
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, file_sha256

STYLES = ("challenge", "lossless")
# The exporter's trainer arguments (build_sentencepiece_tokenizer), besides the input and vocab size.
CHALLENGE_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=BOS_ID,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def challenge_sentences(docs: Iterable[str], max_docs: Optional[int] = None) -> Iterator[str]:
    """The exporter's training sentences: each document with NULs as spaces, stripped, non-empty."""
    for text in islice(docs, max_docs):
        text = text.replace("\x00", " ").strip()
        if text:
            yield text


def train_challenge_tokenizer(docs: Iterable[str], vocab_size: int, out_path: Path,
                              max_docs: Optional[int] = None) -> Path:
    """Train a SentencePiece BPE with the challenge's settings on `docs` (an iterable of document
    texts); write `out_path` atomically. Raises UserError when training fails or the model's bytes
    cannot be counted exactly. With hard_vocab_limit False the model may have fewer pieces than
    `vocab_size` on a small corpus (the caller reports the real size)."""
    out_path = Path(out_path)
    if not 260 < vocab_size <= 65536:
        raise UserError(f"vocab_size {vocab_size} is out of range for {out_path}: a byte-fallback BPE needs more "
                        f"than 260 pieces (4 special + 256 bytes) and the shard format at most 65536.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=challenge_sentences(docs, max_docs), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **CHALLENGE_SETTINGS)
    except RuntimeError as e:
        fix = ("a larger --vocab (byte fallback needs room for every character kept plus 256 bytes)"
               if "required_chars" in str(e) else "a smaller --vocab or more training text")
        raise UserError(f"could not train a {vocab_size}-piece tokenizer for {out_path}: {e}. Use {fix}.") from None
    proto = model.getvalue()
    try:
        ByteTables.from_sentencepiece(spm.SentencePieceProcessor(model_proto=proto))
    except UserError as e:
        raise UserError(f"the tokenizer trained for {out_path}: {e}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, proto)
    return out_path


def _input_docs(path: Path, style: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8.") from None
    if style == "lossless":
        yield text
    else:
        yield from text.splitlines()


def train_tokenizer_file(input_path, vocab_size: int, style: str, out_path, max_docs: Optional[int] = None) -> dict:
    """Train a tokenizer of `style` ("challenge" | "lossless") on a .jsonl or text file and write
    `out_path`. Returns {"vocab_size", "style", "lossless", "sha256", "out"}; raises UserError for
    a missing input, an unknown style or a failed training."""
    input_path, out_path = Path(input_path), Path(out_path)
    if not input_path.is_file():
        raise UserError(f"input file {input_path} not found; pass an existing .jsonl or text file to --input.")
    if style not in STYLES:
        raise UserError(f"unknown tokenizer style {style!r}; use one of {', '.join(STYLES)}.")
    if max_docs is not None and style != "challenge":
        raise UserError("--max-docs is the challenge style's tokenizer_train_docs; drop it for --style lossless.")
    docs = _input_docs(input_path, style)
    if style == "challenge":
        train_challenge_tokenizer(docs, vocab_size, out_path, max_docs)
    else:
        train_tokenizer_docs(docs, vocab_size, out_path)
    sp = spm.SentencePieceProcessor(model_file=str(out_path))
    return {"vocab_size": sp.vocab_size(), "style": style, "lossless": is_lossless(sp),
            "sha256": file_sha256(out_path), "out": str(out_path)}
