"""CaseOps (pipeline/data/caseops.py; pg_mechanics.md §2.7): the transform is a bijection, the
val byte sidecar sums to the raw text's bytes, a run on such a directory counts the sidecar, and
`pgolf data prepare` takes the sp8192 family.

    .venv/bin/python -m pytest -q tests/test_caseops.py
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED
from pipeline.data import caseops
from pipeline.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode
from pipeline.data.shards import list_shards, load_byte_sidecar, load_shard
from pipeline.errors import UserError

SP8192 = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model"
# letters of both cases, the markers themselves, digits, spaces, accents, an emoji, CJK
ALPHABET = st.sampled_from(list("aAbBqQzZ") + list(caseops.MARKERS) + list(" \n\t.,'-19") +
                           ["\u00e9", "\u00c9", "\U0001f600", "\u6f22", "\ue000", "\u2581"])


@given(st.text(ALPHABET, max_size=60) | st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_the_transform_is_a_bijection(text):
    enc = encode(text)
    assert decode(enc) == text
    assert encode(decode(enc)) == enc
    assert not any(c.isupper() for c in enc if c.isascii())  # every ASCII capital became a marker


def test_the_transform_on_each_kind_of_word():
    assert encode("the cat") == "the cat"
    assert encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert encode("iPhone McDonald A x") == f"i{CAPNEXT}phone {TITLE}mc{CAPNEXT}donald {TITLE}a x"
    assert encode("ABc") == f"{TITLE}a{CAPNEXT}bc"
    assert encode(f"a{TITLE}b{ESC}") == f"a{ESC}{TITLE}b{ESC}{ESC}"  # literal markers are escaped
    assert encode("CAFÉ café") == f"{ALLCAPS}caf\u00c9 caf\u00e9"  # only ASCII letters change


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} a", f"a{TITLE}b", f"{CAPNEXT}{CAPNEXT}a", ESC, f"{ALLCAPS}{ESC}x"])
def test_malformed_transforms_are_refused(bad):
    with pytest.raises(CaseOpsError):
        decode(bad)


def test_sidecar_counts_follow_the_raw_bytes_of_each_token():
    """A marker or ESC stands for no raw byte; an escaped marker for its 3; a character split over
    byte pieces counts once, at its first byte."""
    surface = f"{TITLE}ab {ESC}{TITLE}\u00e9".encode()
    lengths = np.array([3, 3, 3, 3, 1, 1])  # TITLE, "ab ", ESC, literal TITLE, é as two byte pieces
    assert caseops._token_counts(surface, lengths).tolist() == [0, 3, 0, 3, 2, 0]


# --------------------------------------------------------------------------------------------
# prepare


def _docs(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "Paris", "NASA", "iPhone", "of", "and", "London", "x", "A", "caf\u00e9", "BBC", "McDonald"]
    docs = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
        if rng.random() < 0.2:
            text += f" {rng.choice(caseops.MARKERS)} literal"
        docs.append(text + rng.choice([".", "!\n", " \U0001f600", ""]))
    return docs


@pytest.fixture(scope="module")
def caseops_jsonl(tmp_path_factory):
    from pipeline.data.prepare import prepare_jsonl

    root = tmp_path_factory.mktemp("caseops")
    src = root / "docs.jsonl"
    docs = _docs(400)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_jsonl(src, root / "prepared", vocab_size=320, val_docs=60, caseops=True)
    return root / "prepared", docs, meta


def test_the_val_sidecar_sums_to_the_raw_text_bytes(caseops_jsonl):
    out, docs, meta = caseops_jsonl
    raw = sum(len(d.encode("utf-8")) for d in docs[:60])
    assert meta["text_transform"] == "caseops_v1" and meta["val_roundtrip_exact"] is True
    assert meta["val_raw_bytes"] == raw == meta["val_sidecar_bytes"]
    (val,) = list_shards(out, "val")
    assert (out / "data_val_bytes_000000.bin").is_file()
    tokens, side = np.asarray(load_shard(val)), load_byte_sidecar([val])
    assert side.shape == tokens.shape and int(side.sum()) == raw
    assert (side[tokens == 1] == 0).all()  # BOS
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    marker_ids = [sp.piece_to_id(m) for m in caseops.MARKERS]
    assert all(sp.encode(m) == [i] for m, i in zip(caseops.MARKERS, marker_ids))  # single pieces
    assert (side[np.isin(tokens, marker_ids)] <= 3).all()  # 0, or 3 for an escaped literal
    # each document's counts sum to its own raw bytes
    bos = np.flatnonzero(tokens == 1).tolist() + [tokens.size]
    per_doc = [int(side[a:b].sum()) for a, b in zip(bos[:-1], bos[1:])]
    assert per_doc == [len(d.encode("utf-8")) for d in docs[:60]]
    # the shards hold the transform: they decode to the transformed documents
    assert sp.decode(tokens[1:bos[1]].tolist()) == encode(docs[0])


def test_a_given_caseops_tokenizer_gives_the_same_export(caseops_jsonl, tmp_path):
    from pipeline.data.prepare import prepare_jsonl

    out, _, meta = caseops_jsonl
    again = prepare_jsonl(out.parent / "docs.jsonl", tmp_path / "o", tokenizer_path=out / "tokenizer.model",
                          val_docs=60, caseops=True)
    assert again["tokenizer_trained"] is False and again["val_sidecar_bytes"] == meta["val_sidecar_bytes"]
    for name in ("data_val_000000.bin", "data_val_bytes_000000.bin", "data_train_000000.bin"):
        assert (tmp_path / "o" / name).read_bytes() == (out / name).read_bytes()


def test_the_text_path_writes_an_exact_sidecar(tmp_path):
    from pipeline.data.prepare import prepare_text

    text = "\n".join(_docs(300, seed=1)) + "\n"
    src = tmp_path / "t.txt"
    src.write_text(text)
    meta = prepare_text(src, tmp_path / "out", vocab_size=320, caseops=True)
    assert meta["val_sidecar_bytes"] == meta["val_raw_bytes"] == len(text.encode()) - meta["split_byte"]
    assert int(load_byte_sidecar(list_shards(tmp_path / "out", "val")).sum()) == meta["val_raw_bytes"]


def test_a_run_on_a_caseops_directory_counts_the_sidecar(caseops_jsonl, tmp_path):
    """`pgolf run` through every stage, with phased LoRA TTT: the scores divide by the sidecar's bytes."""
    from test_cli import cli_inprocess, run_dir_of, sets

    out, _, meta = caseops_jsonl
    extra = sets("train.max_steps=1", "data.max_val_tokens=1024", "ttt.mode=phased_lora", "ttt.lora_rank=4",
                 "ttt.lora_chunk_tokens=16", "ttt.phase_prefix_docs=4", "ttt.phases=2", "ttt.epochs=1")
    proc = cli_inprocess("run", "tiny", "--data", str(out), "--device", "cpu", "--out", str(tmp_path), *extra,
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "score byte_source=sidecar" in proc.stdout
    report = json.loads((run_dir_of(tmp_path) / "report.json").read_text())
    assert report["byte_source"] == "sidecar" and report["ttt_compliant"] is True
    side = load_byte_sidecar(list_shards(out, "val"))
    assert report["val_bytes"] == int(side[1:1025].sum())  # targets 1..1024, each its raw bytes
    assert "ttt_exact mode=phased_lora" in proc.stdout and "ttt_phase 2/2" in proc.stdout


def test_caseops_refuses_a_tokenizer_without_marker_pieces(tmp_path):
    from pipeline.data.prepare import prepare_jsonl

    if not SP8192.is_file():
        pytest.skip("the shared sp8192 tokenizer is absent")
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(20)))
    with pytest.raises(UserError, match="no single piece for the CaseOps markers"):
        prepare_jsonl(src, tmp_path / "o", tokenizer_path=SP8192, val_docs=5, caseops=True)


def test_prepare_takes_the_sp8192_tokenizer(tmp_path):
    from pipeline.data.prepare import prepare_jsonl

    if not SP8192.is_file():
        pytest.skip("the shared sp8192 tokenizer is absent")
    src = tmp_path / "d.jsonl"
    docs = _docs(30, seed=2)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_jsonl(src, tmp_path / "o", tokenizer_path=SP8192, val_docs=10)
    assert meta["vocab_size"] == 8192 and meta["lossless"] is False  # nmt_nfkc, as the challenge's
    assert meta["n_docs"] == {"train": 20, "val": 10}
    val = np.asarray(load_shard(list_shards(tmp_path / "o", "val")[0]))
    assert int((val == 1).sum()) == 10 and int(val.max()) < 8192
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    assert val[1:].tolist()[:5] == sp.encode(docs[0])[:5]
