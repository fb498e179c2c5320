"""`prepare`: byte-exact 90/10 split, shards that decode back, jsonl BOS layout, meta.json,
atomic output handling, skip-when-up-to-date, and the byte accounting bpb relies on."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

import pipeline.data.prepare as prep
from eval.byte_tables import ByteTables
from pipeline.data.shards import list_shards, load_shard, read_header
from pipeline.data.tokenizer import load_tokenizer, train_tokenizer
from pipeline.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCAB = 320


def _words(n, seed):
    rng = random.Random(seed)
    vocab = "we few happy band of brothers for he today that sheds his blood with me shall be".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def _text_with_euro_at_cut(total=12000):
    """ASCII text whose byte int(0.9*n) falls inside a 3-byte '€'."""
    cut = int(total * 0.9)
    head = _words(3000, 0).replace("band", "band\n")[: cut - 1]
    head = head + " " * (cut - 1 - len(head))
    tail_len = total - cut - 2  # '€' takes bytes cut-1, cut, cut+1
    tail = (" zyzzyva" * 60 + "\n" + _words(2000, 1))[:tail_len]
    text = head + "€" + tail
    assert len(text.encode()) == total
    return text


def _tokens(out_dir, split):
    return np.concatenate([load_shard(p) for p in list_shards(out_dir, split)]).astype(np.int64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = root / "src.txt"
    src.write_text(_text_with_euro_at_cut(), encoding="utf-8")
    meta = prep.prepare_text(src, root / "out", vocab_size=VOCAB)
    return src, root / "out", meta


def test_split_point_moves_to_char_boundary():
    data = _text_with_euro_at_cut().encode()
    assert data[10799:10802] == "€".encode()
    assert prep.text_split_point(data) == 10802  # int(0.9*12000)=10800 is inside the '€'
    assert prep.text_split_point(b"abcdefghij") == 9


def test_text_shards_decode_back(prepared):
    src, out, meta = prepared
    data = src.read_bytes()
    train_text, val_text = data[:10802].decode(), data[10802:].decode()
    sp = load_tokenizer(out / "tokenizer.model")
    for split, text in (("train", train_text), ("val", val_text)):
        toks = _tokens(out, split)
        assert toks[0] == 1 and (toks == 1).sum() == 1  # one document, one BOS
        assert sp.decode(toks[1:].tolist()) == text


def test_text_meta(prepared):
    src, out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["split_byte"] == 10802 and meta["val_raw_bytes"] == 12000 - 10802
    assert meta["vocab_size"] == VOCAB and meta["tokenizer"] == "tokenizer.model"
    assert meta["lossless"] is True and meta["val_roundtrip_exact"] is True
    assert meta["source"] == "src.txt" and len(meta["source_sha256"]) == 64
    assert meta["n_docs"] == {"train": 1, "val": 1}
    assert meta["val_tokens"] == sum(read_header(p) for p in list_shards(out, "val"))
    assert meta["train_tokens"] == sum(read_header(p) for p in list_shards(out, "train"))
    assert sorted(p.name for p in out.iterdir()) == [
        "data_train_000000.bin", "data_val_000000.bin", "meta.json", "tokenizer.model"]


def test_tokenizer_is_trained_on_train_split_only(prepared, tmp_path):
    # Training is deterministic, so "trained on the train split only" means byte-identical to
    # a model trained on exactly the first split_byte bytes.
    src, out, meta = prepared
    train_text = src.read_bytes()[: meta["split_byte"]].decode()
    alone = train_tokenizer(train_text, VOCAB, tmp_path / "alone.model")
    assert (out / "tokenizer.model").read_bytes() == alone.read_bytes()


def test_ensure_prepared_skips_then_rebuilds(prepared, tmp_path):
    src, out, meta = prepared
    shard = out / "data_val_000000.bin"
    before = shard.stat().st_mtime_ns
    assert prep.ensure_prepared(out, text_path=src, vocab_size=VOCAB) == meta
    assert shard.stat().st_mtime_ns == before
    # A different source text must be rebuilt, not skipped.
    other = tmp_path / "src.txt"
    other.write_text(_text_with_euro_at_cut().replace("zyzzyva", "qwertyu"), encoding="utf-8")
    out2 = tmp_path / "out"
    m1 = prep.ensure_prepared(out2, text_path=other, vocab_size=VOCAB)
    other.write_text(other.read_text() + "more text at the end\n", encoding="utf-8")
    m2 = prep.ensure_prepared(out2, text_path=other, vocab_size=VOCAB)
    data = other.read_bytes()
    assert m2["source_sha256"] != m1["source_sha256"]
    assert m2["val_raw_bytes"] == len(data) - prep.text_split_point(data) != m1["val_raw_bytes"]


def test_refuses_unrelated_nonempty_dir_and_leaves_no_staging(prepared, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError) as e:
        prep.prepare_text(prepared[0], out, vocab_size=VOCAB)
    assert str(out) in str(e.value)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_earlier_prepare_is_replaced_only_when_asked(prepared, tmp_path):
    src = prepared[0]
    out = tmp_path / "out"
    first = prep.prepare_text(src, out, vocab_size=VOCAB)
    with pytest.raises(UserError, match="pass --overwrite to replace it"):
        prep.prepare_text(src, out, vocab_size=VOCAB)
    assert prep.prepare_text(src, out, vocab_size=VOCAB, overwrite=True)["source_sha256"] == first["source_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or trash left behind


def test_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt is not UTF-8 text .*offset 3"):
        prep.prepare_text(bad, tmp_path / "out")


def test_jsonl_bos_layout_and_given_tokenizer(prepared, tmp_path):
    docs = [_words(40 + 7 * i, 10 + i) for i in range(12)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    tok = prepared[1] / "tokenizer.model"
    meta = prep.prepare_jsonl(src, tmp_path / "out", tokenizer_path=tok, val_docs=3)
    sp = load_tokenizer(tok)
    for split, part in (("val", docs[:3]), ("train", docs[3:])):
        expected = np.concatenate([[1] + sp.encode(d) for d in part])
        assert _tokens(tmp_path / "out", split).tolist() == expected.tolist()
    assert meta["n_docs"] == {"train": 9, "val": 3}
    assert meta["val_raw_bytes"] == sum(len(d.encode()) for d in docs[:3])
    assert meta["tokenizer_trained"] is False and meta["vocab_size"] == VOCAB
    # Default val split: max(1, 10%) of documents.
    assert prep.prepare_jsonl(src, tmp_path / "out2", tokenizer_path=tok)["n_docs"]["val"] == 1
    with pytest.raises(UserError, match="model.vocab_size is 1024"):
        prep.prepare_jsonl(src, tmp_path / "out3", tokenizer_path=tok, vocab_size=1024)


@pytest.mark.parametrize(
    "lines, where",
    [(['{"text": "a"}', '{"text": "b"}', "{not json"], ":3: malformed JSON"),
     (['{"text": "a"}', '{"body": "b"}'], ':2: expected a JSON object with a string "text"')],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, where):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        prep.prepare_jsonl(src, tmp_path / "out")
    assert f"bad.jsonl{where}" in str(e.value)


def test_chunked_encoding_equals_whole(prepared, monkeypatch):
    sp = load_tokenizer(prepared[1] / "tokenizer.model")
    assert prep.chunk_safe(sp)
    # a stretch with no space longer than a chunk must not be cut inside (a piece may span it)
    text = prepared[0].read_text() + "   three spaces  two\n\tend" + " " + "shall" * 30 + " be"
    whole = prep._encode(sp, text, True)
    monkeypatch.setattr(prep, "_ENCODE_CHUNK_CHARS", 37)
    assert prep._encode(sp, text, True).tolist() == whole.tolist()
    assert ByteTables.from_sentencepiece(sp).count_bytes(whole) == len(text.encode())


def test_tinyshakespeare_val_bytes_and_exact_accounting(tmp_path):
    src = SHARED / "data" / "tinyshakespeare.txt"
    if not src.exists():
        pytest.skip("shared reference folder not present")
    meta = prep.prepare_text(src, tmp_path / "ts", vocab_size=1024)
    assert meta["val_raw_bytes"] == 111540 and meta["split_byte"] == 1003854
    assert meta["lossless"] and meta["val_roundtrip_exact"]
    sp = load_tokenizer(tmp_path / "ts" / "tokenizer.model")
    val = _tokens(tmp_path / "ts", "val")
    # The bytes the scorer will divide by are exactly the raw val bytes: bpb is honest.
    assert ByteTables.from_sentencepiece(sp).count_bytes(val) == meta["val_raw_bytes"]
