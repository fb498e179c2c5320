"""Lossless SentencePiece BPE tokenizers: train, load, and read their settings.

bpb divides the model's nats by the *bytes the tokens stand for*, computed from the
tokenizer's piece table (pg_mechanics §2; `eval.byte_tables` builds that table from the
settings `tokenizer_spec` reads here and refuses a model it cannot count exactly). That count
equals the raw UTF-8 size of the text only if the tokenizer changes nothing: the challenge's
own sp1024 uses the `nmt_nfkc` normalizer, which collapses newlines and repeated spaces, so
its byte count is of a different text. Ours keeps every byte:

* identity normalization, no whitespace trimming, no dummy prefix;
* byte fallback, so characters never seen in training become `<0xNN>` pieces (1 byte each);
* whitespace-only pieces are *not* allowed and words are split before every space, so no
  piece holds a "▁" after its first character: a text cut right before a space encodes to
  the same tokens as a whole (`chunk_safe`, which `prepare` relies on for huge texts);
* a standalone "▁" piece must exist (upstream sentencepiece issue #897): it is checked.

Known limit: SentencePiece itself reads a literal U+2581 ("▁") in the input as a space, so
text containing that character does not round-trip (and counts 1 byte instead of 3);
`prepare` records whether the validation text round-trips exactly.

Use:
    sp_path = train_tokenizer(text, 1024, Path("tokenizer.model"))
    sp = load_tokenizer(sp_path); check_vocab(sp, recipe.model.vocab_size, sp_path)
    is_lossless(sp)           # False for the challenge's sp1024
    tokenizer_spec(sp)        # TokenizerSpec(normalizer='identity', add_dummy_prefix=False, ...)
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from eval.sp_model import TokenizerSpec, _proto_fields, tokenizer_spec  # noqa: F401  (re-exported)
from pipeline.errors import UserError
from pipeline.fileio import atomic_write

SPACE_PIECE = "\u2581"  # SentencePiece's visible space, "▁"
BOS_ID = 1
# Training sentences are chunks of whole lines of at most this many bytes. SentencePiece drops
# the trailing newline of each sentence and skips sentences over max_sentence_length, so many
# lines per chunk keep newlines (and pieces like ".\n") in the statistics.
_CHUNK_BYTES = 4096
_MAX_SENTENCE_BYTES = 16384
# A probe for is_lossless: runs of spaces, leading/trailing spaces, tabs, CR/LF, blank lines,
# characters NFKC would rewrite (ligature, full-width, superscript) and ones that need byte
# fallback in any small vocabulary (euro sign, emoji, CJK).
_PROBE = " lead\t tab  two   three\n\n\r\nﬁne Ｆull x² € 😀 漢字 trail  \n"


def _training_sentences(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        chunk: list[str] = []
        size = 0
        for m in re.finditer(r"[^\n]*\n|[^\n]+", doc):
            line = m.group(0)
            n = len(line.encode("utf-8"))
            if n > _CHUNK_BYTES:
                # A giant line (minified text, a table): slice it so the trainer still sees it.
                if chunk:
                    yield "".join(chunk)
                    chunk, size = [], 0
                step = _CHUNK_BYTES // 4  # 4 bytes is the longest UTF-8 character
                for i in range(0, len(line), step):
                    yield line[i : i + step]
                continue
            if size + n > _CHUNK_BYTES and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def train_tokenizer_docs(docs: Iterable[str], vocab_size: int, out_path: Path,
                         user_defined_symbols: tuple[str, ...] = ()) -> Path:
    """Train the lossless BPE model on an iterable of documents; write `out_path` atomically.
    `user_defined_symbols` are always single pieces (CaseOps' markers, pipeline.data.caseops)."""
    out_path = Path(out_path)
    if not 260 < vocab_size <= 65536:
        raise UserError(
            f"vocab_size {vocab_size} is out of range for {out_path}: a byte-fallback BPE needs "
            f"more than 260 pieces (4 special + 256 bytes) and the shard format at most 65536."
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(docs),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=False,
            character_coverage=0.999,  # the challenge's setting; rarer chars fall back to bytes
            pad_id=0,
            bos_id=BOS_ID,
            eos_id=2,
            unk_id=3,
            hard_vocab_limit=False,  # we check the size ourselves and say what to do
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # use every sentence: no random sampling
            shuffle_input_sentence=False,
            num_threads=1,  # single-threaded training is bit-for-bit deterministic
            user_defined_symbols=list(user_defined_symbols),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(
            f"could not train a {vocab_size}-piece tokenizer for {out_path}: {e}. "
            f"Use a smaller vocab_size or more training text."
        ) from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.vocab_size() != vocab_size:
        raise UserError(
            f"the training text for {out_path} is too small to learn {vocab_size} pieces "
            f"(only {sp.vocab_size()}); use a smaller vocab_size or more text."
        )
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise UserError(
            f"the tokenizer trained for {out_path} has no standalone '{SPACE_PIECE}' piece (the "
            f"training text has no spaces), so byte accounting cannot be exact; train on real text."
        )
    inner = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if SPACE_PIECE in sp.id_to_piece(i)[1:]]
    if inner:
        # Guaranteed by allow_whitespace_only_pieces=False with whitespace splitting; a failure
        # means a sentencepiece change broke what `prepare`'s chunked encoding relies on.
        raise RuntimeError(f"pieces with an inner '{SPACE_PIECE}' make chunked encoding inexact: {inner[:5]}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, proto)
    return out_path


def train_tokenizer(text: str, vocab_size: int, out_path: Path) -> Path:
    """Train the lossless BPE model on one text; write `out_path` (.model) atomically."""
    return train_tokenizer_docs([text], vocab_size, out_path)


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"tokenizer {path} not found; run `pgolf data prepare` (it writes tokenizer.model "
            f"next to the shards) or pass an existing .model file."
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"tokenizer {path} is not a readable SentencePiece .model file ({e}); "
            f"re-run `pgolf data prepare` or pass the right file."
        ) from None
    return sp


def check_vocab(sp: spm.SentencePieceProcessor, expected_vocab: int, source) -> None:
    """UserError unless the tokenizer has exactly `expected_vocab` pieces."""
    got = sp.vocab_size()
    if got != expected_vocab:
        raise UserError(
            f"{source}: the tokenizer has {got} pieces but model.vocab_size is {expected_vocab}; "
            f"set model.vocab_size: {got} in the recipe, or re-prepare the data with "
            f"`pgolf data prepare --vocab {expected_vocab}`."
        )


# The model's settings (TokenizerSpec, read from its proto without protobuf) live beside the byte
# tables that depend on them, in eval.sp_model; re-exported here for the data side.


def normalizer_name(sp: spm.SentencePieceProcessor) -> str:
    """The normalizer rule a model was trained with ("identity", "nmt_nfkc", ...)."""
    return tokenizer_spec(sp).normalizer


def is_lossless(sp: spm.SentencePieceProcessor) -> bool:
    """True if the model normalizes nothing and round-trips arbitrary text (whitespace, CR/LF,
    NFKC-sensitive and unseen characters) exactly."""
    if normalizer_name(sp) != "identity":
        return False
    return sp.decode(sp.encode(_PROBE)) == _PROBE


def chunk_safe(sp: spm.SentencePieceProcessor) -> bool:
    """True if encoding a text in parts cut right before a space gives exactly the tokens of the
    whole text, so `prepare` may encode a huge text in chunks.

    That needs: a lossless model (no normalization that could see across the cut); no dummy
    prefix and no whitespace trimming (each part would gain a "▁" or lose its leading space);
    and no piece with a "▁" after its first character (only such a piece could span a cut made
    before a space; suffix-"▁" models and split_by_whitespace=false models have them). Then no
    piece crosses the cut and BPE merges or unigram paths of the two sides are independent."""
    spec = tokenizer_spec(sp)
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        return False
    if any(SPACE_PIECE in sp.id_to_piece(i)[1:] for i in range(sp.vocab_size())):
        return False
    return is_lossless(sp)
