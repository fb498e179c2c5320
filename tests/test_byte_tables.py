"""Byte tables: the bytes behind bpb must match the decoded text (upstream #897/#1719/#1271).

A tiny lossless byte-fallback tokenizer is trained in-process (no files, well under a
second); the lossy shared sp1024 model is used when ../shared is present.
"""

import io
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from eval.byte_tables import ByteTables
from pipeline.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SP1024 = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
BOS, EOS, UNK = 1, 2, 3


def _train(lines, vocab_size):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0,
        hard_vocab_limit=False, pad_id=0, bos_id=BOS, eos_id=EOS, unk_id=UNK, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def sp_lossless():
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog and then runs far away into "
             "woods where nobody sees it").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!?")
             for _ in range(400)]
    return _train(lines, 320)


TEXTS = [
    "the fox jumps over the dog.",
    " a leading space right after BOS",
    "two  spaces,\nnewlines\n\nand a tab\there",
    "unseen chars: é, 日本語, 🙂 and ~^|",  # byte fallback
    "\n",
]


def _stream(sp, texts):
    out = []
    for t in texts:
        out += [BOS] + sp.encode(t)
    return out


def _starts_with_space_piece(sp, text):
    ids = sp.encode(text)
    return bool(ids) and sp.id_to_piece(ids[0]).startswith("\u2581")


def test_tables_shape_dtype_and_padding_slots(sp_lossless):
    tables = ByteTables.from_sentencepiece(sp_lossless, vocab_size=400)
    assert tables.size == 400  # max(sp vocab 320, requested 400)
    assert tables.base_bytes.dtype == torch.int16
    assert tables.has_leading_space.dtype == torch.bool and tables.is_boundary.dtype == torch.bool
    assert bool(tables.is_boundary[320:].all()) and int(tables.base_bytes[320:].abs().sum()) == 0
    for tid in (0, BOS, EOS, UNK):  # pad / control / unknown: 0 bytes, boundary
        assert int(tables.base_bytes[tid]) == 0 and bool(tables.is_boundary[tid])
    byte_id = sp_lossless.piece_to_id("<0xC3>")
    assert int(tables.base_bytes[byte_id]) == 1 and not bool(tables.is_boundary[byte_id])
    sid = sp_lossless.piece_to_id("\u2581")
    assert int(tables.base_bytes[sid]) == 0 and bool(tables.has_leading_space[sid])
    fox = sp_lossless.piece_to_id("\u2581f")
    assert int(tables.base_bytes[fox]) == 1 and bool(tables.has_leading_space[fox])


@pytest.mark.parametrize("text", TEXTS)
def test_lossless_single_document_matches_decoded_utf8(sp_lossless, text):
    sp = sp_lossless
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # the tokenizer really is lossless on this text
    tables = ByteTables.from_sentencepiece(sp)
    counted = tables.count_bytes([BOS] + ids)
    # The one documented exception (§2.5.2): a "▁" right after BOS is not counted, because
    # BOS is a boundary. sp.decode keeps that space, so the count is exactly one byte less.
    expected = len(text.encode("utf-8")) - int(_starts_with_space_piece(sp, text))
    assert counted == expected


def test_leading_space_after_bos_is_the_only_discount(sp_lossless):
    sp = sp_lossless
    text = " a leading space right after BOS"
    assert _starts_with_space_piece(sp, text)
    tables = ByteTables.from_sentencepiece(sp)
    ids = sp.encode(text)
    assert tables.count_bytes([BOS] + ids) == len(text.encode()) - 1
    # the same text after a normal token keeps its space byte
    assert tables.count_bytes([BOS] + sp.encode("x") + ids) == 1 + len(text.encode())


def test_multi_document_stream_with_control_tokens(sp_lossless):
    sp = sp_lossless
    tables = ByteTables.from_sentencepiece(sp)
    stream = _stream(sp, TEXTS)
    expected = sum(len(t.encode()) - int(_starts_with_space_piece(sp, t)) for t in TEXTS)
    assert tables.count_bytes(stream) == expected
    ids = torch.tensor(stream)
    per = tables.target_bytes(ids[:-1], ids[1:])
    assert per.dtype == torch.int64
    # every BOS target (the "end of document" prediction) contributes 0 bytes
    assert int(per[(ids[1:] == BOS)].sum()) == 0
    # an EOS in the middle also counts 0 and makes the next "▁" free
    a, b = sp.encode("dog"), sp.encode(" fox")
    with_eos = [BOS] + a + [EOS] + b
    assert tables.count_bytes(with_eos) == len("dog") + len("fox")
    assert tables.count_bytes([BOS] + a + b) == len("dog fox")


def test_target_bytes_formula_elementwise(sp_lossless):
    tables = ByteTables.from_sentencepiece(sp_lossless)
    sid = sp_lossless.piece_to_id("\u2581the")
    x = sp_lossless.piece_to_id("x")
    prev = torch.tensor([x, BOS, UNK, x])
    tgt = torch.tensor([sid, sid, sid, x])
    assert tables.target_bytes(prev, tgt).tolist() == [4, 3, 3, 1]
    with pytest.raises(ValueError):
        tables.target_bytes(prev, tgt[:2])


@pytest.mark.skipif(not SP1024.is_file(), reason="shared tokenizer not available")
def test_lossy_sp1024_counts_normalized_text_and_zero_for_unk():
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    tables = ByteTables.from_sentencepiece(str(SP1024), vocab_size=1024)
    assert tables.size == 1024 and int(tables.base_bytes[sp.unk_id()]) == 0
    text = "naïve façade Zürich ümlaut ﬁne"  # unknown letters mid-word, an NFKC ligature
    ids = sp.encode(text)
    assert sp.unk_id() in ids
    # Reference: the normalized decoded text with each <unk> rendered as nothing (sp.decode
    # would print " ⁇ " for it; the tables give it 0 bytes).
    decoded = sp.decode([i for i in ids if i != sp.unk_id()])
    counted = tables.count_bytes([BOS] + ids)
    assert counted == len(decoded.encode("utf-8"))
    assert counted < len(text.encode("utf-8"))  # lossy: fewer bytes than the raw text
    # An <unk> is a boundary: the "▁" of the token after it is not counted either.
    ids2 = sp.encode("x é y")
    assert [sp.id_to_piece(i) for i in ids2][-2:] == ["<unk>", "\u2581y"]
    dec2 = sp.decode([i for i in ids2 if i != sp.unk_id()])
    assert tables.count_bytes([BOS] + ids2) == len(dec2.encode()) - 1


def test_missing_space_piece_is_refused_and_would_miscount():
    rng = random.Random(1)
    sp = _train(["".join(rng.choice("abcdef") for _ in range(30)) for _ in range(100)], 280)
    with pytest.raises(UserError, match="#897"):
        ByteTables.from_sentencepiece(sp)
    tables = ByteTables.from_sentencepiece(sp, require_space_piece=False)
    ids = sp.encode("ab cd")  # the space is spelled as the 3 UTF-8 bytes of "▁"
    assert tables.count_bytes([BOS] + ids) == len("ab cd") + 2


def test_bad_inputs_raise_user_errors(tmp_path, sp_lossless):
    with pytest.raises(UserError, match="not found"):
        ByteTables.from_sentencepiece(tmp_path / "missing.model")
    with pytest.raises(UserError):
        ByteTables.from_sentencepiece(object())
    tables = ByteTables.from_sentencepiece(sp_lossless)
    with pytest.raises(UserError, match="different tokenizer"):
        tables.count_bytes(np.array([BOS, 5, 320]))
    assert tables.count_bytes([BOS]) == 0
