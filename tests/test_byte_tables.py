"""Byte tables: the bytes behind bpb must match the decoded text (upstream #897/#1719/#1271).

A tiny lossless byte-fallback tokenizer is trained in-process (no files, well under a
second), once without and once with a dummy prefix (whose leading "▁" is conditional); the
lossy shared sp1024 model is used when ../shared is present. The property over random texts
and every kind of model is in test_byte_exactness.py; the byte sidecar's use is tested here.
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


def _train(lines, vocab_size, dummy_prefix=False):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, character_coverage=1.0,
        hard_vocab_limit=False, pad_id=0, bos_id=BOS, eos_id=EOS, unk_id=UNK, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _lines():
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog and then runs far away into "
             "woods where nobody sees it").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!?")
            for _ in range(400)]


@pytest.fixture(scope="module")
def sp_lossless():
    return _train(_lines(), 320)


@pytest.fixture(scope="module")
def sp_dummy():
    """Lossless too, but every text gets a dummy "▁" before it: a conditional leading space."""
    return _train(_lines(), 320, dummy_prefix=True)


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


def test_tables_shape_dtype_and_padding_slots(sp_lossless, sp_dummy):
    tables = ByteTables.from_sentencepiece(sp_lossless, vocab_size=400)
    assert tables.size == 400  # max(sp vocab 320, requested 400)
    assert tables.base_bytes.dtype == torch.int16
    assert tables.has_leading_space.dtype == torch.bool and tables.is_boundary.dtype == torch.bool
    assert bool(tables.is_boundary[320:].all()) and int(tables.base_bytes[320:].abs().sum()) == 0
    for tid in (0, BOS, EOS, UNK):  # pad / control / unknown: 0 bytes, boundary
        assert int(tables.base_bytes[tid]) == 0 and bool(tables.is_boundary[tid])
    byte_id = sp_lossless.piece_to_id("<0xC3>")
    assert int(tables.base_bytes[byte_id]) == 1 and not bool(tables.is_boundary[byte_id])
    # No dummy prefix: every "▁" is a real space, always counted (base bytes, no flag).
    sid = sp_lossless.piece_to_id("\u2581")
    assert int(tables.base_bytes[sid]) == 1 and not bool(tables.has_leading_space[sid])
    fox = sp_lossless.piece_to_id("\u2581f")
    assert int(tables.base_bytes[fox]) == 2 and not bool(tables.has_leading_space[fox])
    assert not bool(tables.has_leading_space.any())
    # Dummy prefix: the leading "▁" is conditional (flag, not in base bytes).
    dummy = ByteTables.from_sentencepiece(sp_dummy)
    sid, fox = sp_dummy.piece_to_id("\u2581"), sp_dummy.piece_to_id("\u2581f")
    assert int(dummy.base_bytes[sid]) == 0 and bool(dummy.has_leading_space[sid])
    assert int(dummy.base_bytes[fox]) == 1 and bool(dummy.has_leading_space[fox])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model", ["sp_lossless", "sp_dummy"])
def test_lossless_single_document_matches_decoded_utf8(request, model, text):
    sp = request.getfixturevalue(model)
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # the tokenizer really is lossless on this text
    tables = ByteTables.from_sentencepiece(sp)
    assert tables.count_bytes([BOS] + ids) == len(text.encode("utf-8"))


def test_leading_space_after_bos(sp_lossless, sp_dummy):
    """A document's leading space is text (counted) unless it is the model's dummy prefix.
    The challenge's rule drops the first "▁" after BOS whatever it is, which undercounts such
    a document by one byte with a model that adds no dummy prefix (issue 9)."""
    text = " a leading space right after BOS"
    for sp in (sp_lossless, sp_dummy):
        ids = sp.encode(text)
        assert sp.id_to_piece(ids[0]).startswith("\u2581")
        tables = ByteTables.from_sentencepiece(sp)
        assert tables.count_bytes([BOS] + ids) == len(text.encode())
    tables = ByteTables.from_sentencepiece(sp_lossless)
    ids = sp_lossless.encode(text)
    assert tables.count_bytes([BOS] + sp_lossless.encode("x") + ids) == 1 + len(text.encode())
    # with the dummy prefix, the first "▁" after BOS is the dummy, not counted
    dummy_ids = sp_dummy.encode("a b")
    assert sp_dummy.id_to_piece(dummy_ids[0]).startswith("\u2581")
    assert ByteTables.from_sentencepiece(sp_dummy).count_bytes([BOS] + dummy_ids) == 3


def test_multi_document_stream_with_control_tokens(sp_lossless):
    sp = sp_lossless
    tables = ByteTables.from_sentencepiece(sp)
    stream = _stream(sp, TEXTS)
    expected = sum(len(t.encode()) for t in TEXTS)
    assert tables.count_bytes(stream) == expected
    ids = torch.tensor(stream)
    per = tables.target_bytes(ids[:-1], ids[1:])
    assert per.dtype == torch.int64
    # every BOS target (the "end of document" prediction) contributes 0 bytes
    assert int(per[(ids[1:] == BOS)].sum()) == 0
    # an EOS in the middle counts 0; the space after it is text (no dummy prefix here)
    a, b = sp.encode("dog"), sp.encode(" fox")
    with_eos = [BOS] + a + [EOS] + b
    assert tables.count_bytes(with_eos) == len("dog") + len(" fox")
    assert tables.count_bytes([BOS] + a + b) == len("dog fox")


def test_target_bytes_formula_elementwise(sp_dummy):
    tables = ByteTables.from_sentencepiece(sp_dummy)
    sid = sp_dummy.piece_to_id("\u2581the")
    x = sp_dummy.piece_to_id("x")
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
    tables = ByteTables.from_sentencepiece(sp, exact=False)
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


# --- byte sidecars (pg_mechanics.md §2.7) ------------------------------------------------------


def test_sidecar_replaces_the_formula_and_says_so(sp_lossless):
    sp = sp_lossless
    tables = ByteTables.from_sentencepiece(sp)
    stream = _stream(sp, ["the fox", "a dog"])
    counts = np.arange(len(stream)) % 5  # any values: the sidecar is trusted as given
    counts[np.asarray(stream) == BOS] = 0
    side = tables.with_token_bytes(counts.astype(np.uint16))
    assert tables.byte_source == "tables" and side.byte_source == "sidecar"
    assert side.token_bytes.dtype == torch.int32
    assert side.count_bytes(stream) == int(counts[1:].sum()) != tables.count_bytes(stream)
    assert side.count_bytes(stream[:4]) == int(counts[1:4].sum())  # a truncated stream
    pos = torch.tensor([3, 1, 4])
    ids = torch.tensor(stream)
    assert side.scored_bytes(pos, ids[pos - 1], ids[pos]).tolist() == counts[[3, 1, 4]].tolist()
    assert tables.scored_bytes(pos, ids[pos - 1], ids[pos]).tolist() == \
        tables.target_bytes(ids[pos - 1], ids[pos]).tolist()
    with pytest.raises(ValueError, match="sidecar"):
        side.target_bytes(ids[:-1], ids[1:])  # the formula is never used silently


def test_sidecar_errors(sp_lossless):
    tables = ByteTables.from_sentencepiece(sp_lossless)
    side = tables.with_token_bytes(np.array([0, 3, 1, 2]))
    with pytest.raises(UserError, match="4 counts but the validation stream has 6 tokens"):
        side.check_stream(6)
    side.check_stream(4)
    tables.check_stream(6)  # no sidecar: nothing to match
    with pytest.raises(UserError, match="4 counts"):
        side.count_bytes([BOS, 5, 6, 7, 8])  # longer than its sidecar
    with pytest.raises(UserError, match="negative"):
        tables.with_token_bytes(np.array([0, -1]))
    with pytest.raises(UserError, match="1-D integer"):
        tables.with_token_bytes(np.array([0.0, 1.5]))
