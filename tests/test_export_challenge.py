"""The challenge's export reproduced (`prepare_jsonl(challenge=True)`, pg_mechanics.md §1.1, §1.5) and
`pgolf tokenizer train` in both styles, on a small jsonl made here. The expected shards are rebuilt in
the test from the exporter's rule: the first N documents val, `[BOS] + encode(text)` each, one
stream per split cut into `shard_size`-token files named fineweb_{val,train}_NNNNNN.bin."""

import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import pipeline.data.prepare as prep
from eval.sp_model import tokenizer_spec
from pipeline.data import shards
from pipeline.data.shards import HEADER_BYTES, MAGIC, list_shards, load_shard, read_header
from pipeline.data.tokenizer_train import train_tokenizer_file
from pipeline.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZERS = SHARED / "data" / "tokenizers"
N_DOCS = 40


def _docs(n=N_DOCS, seed=0):
    rng = random.Random(seed)
    words = ("we few we happy few we band of brothers for he today that sheds his blood with me shall be my "
             "brother 1415 Crispin's day caf\u00e9 \u20ac").split()
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(rng.randint(1, 4))]
        docs.append(("  " if i % 7 == 3 else "") + "\n".join(lines) + ("\n" if i % 5 == 0 else ""))
    docs[11] = ""  # an empty document is [BOS] alone
    return docs


def _write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("challenge_export")
    docs = _docs()
    src = _write_jsonl(root / "docs_selected.jsonl", docs)
    model = root / "fineweb_300_bpe.model"
    info = train_tokenizer_file(src, 300, "challenge", model)
    return root, src, docs, model, info


def _expected_shards(sp, docs, n_val, shard_size):
    out = {}
    for split, part in (("val", docs[:n_val]), ("train", docs[n_val:])):
        stream = np.concatenate([[1] + sp.encode(d) for d in part]).astype(np.int64)
        out[split] = [stream[i : i + shard_size].tolist() for i in range(0, stream.size, shard_size)]
    return out


def test_challenge_style_tokenizer_has_the_exporters_settings(corpus):
    _, _, _, model, info = corpus
    sp = spm.SentencePieceProcessor(model_file=str(model))
    spec = tokenizer_spec(sp)
    assert (spec.normalizer, spec.add_dummy_prefix, spec.byte_fallback) == ("nmt_nfkc", False, True)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.is_byte(4) and sp.id_to_piece(4) == "<0x00>"  # 256 byte pieces right after the specials
    assert sp.encode("1415") == [sp.piece_to_id(c) for c in "1415"]  # split_digits
    assert info["style"] == "challenge" and info["lossless"] is False and info["vocab_size"] == sp.vocab_size()
    published = TOKENIZERS / "fineweb_8192_bpe.model"
    if published.exists():  # the one published model trained with byte fallback: same settings but the size
        assert tokenizer_spec(spm.SentencePieceProcessor(model_file=str(published))) == spec


def test_lossless_style_and_bad_input(corpus, tmp_path):
    _, src, _, _, _ = corpus
    info = train_tokenizer_file(src, 300, "lossless", tmp_path / "l.model")
    assert info["lossless"] is True and info["vocab_size"] == 300
    with pytest.raises(UserError, match="--max-docs"):
        train_tokenizer_file(src, 300, "lossless", tmp_path / "x.model", max_docs=3)
    with pytest.raises(UserError, match="not found"):
        train_tokenizer_file(tmp_path / "absent.jsonl", 300, "challenge", tmp_path / "y.model")


def test_export_matches_the_exporters_rule_byte_for_byte(corpus, tmp_path):
    _, src, docs, model, _ = corpus
    sp = spm.SentencePieceProcessor(model_file=str(model))
    meta = prep.prepare_jsonl(src, tmp_path / "out", tokenizer_path=model, val_docs=7, challenge=True, shard_size=64)
    want = _expected_shards(sp, docs, 7, 64)
    for split in ("val", "train"):
        paths = list_shards(tmp_path / "out", split)
        assert [p.name for p in paths] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(want[split]))]
        assert [load_shard(p).tolist() for p in paths] == want[split]
        for p in paths[:-1]:
            assert read_header(p) == 64  # full shards; only the last of a split is shorter
        raw = paths[0].read_bytes()
        assert np.frombuffer(raw[:12], "<i4").tolist() == [MAGIC, 1, len(want[split][0])]
        assert len(raw) == HEADER_BYTES + 2 * len(want[split][0])
    assert meta["prefix"] == "fineweb" and meta["challenge_export"] and meta["shard_size"] == 64
    assert meta["n_docs"] == {"val": 7, "train": N_DOCS - 7}
    assert meta["val_tokens"] == sum(map(len, want["val"]))


def test_shards_roll_over_at_the_module_shard_size(corpus, tmp_path, monkeypatch):
    _, src, docs, model, _ = corpus
    monkeypatch.setattr(shards, "SHARD_SIZE", 50)
    prep.prepare_jsonl(src, tmp_path / "out", tokenizer_path=model, val_docs=5, challenge=True)
    sizes = [read_header(p) for p in list_shards(tmp_path / "out", "train")]
    assert len(sizes) > 2 and set(sizes[:-1]) == {50} and 0 < sizes[-1] <= 50


def test_val_docs_from_the_source_manifest_else_50000(corpus, tmp_path):
    _, src, docs, model, _ = corpus
    with pytest.raises(UserError, match="val_docs=50000"):
        prep.prepare_jsonl(src, tmp_path / "a", tokenizer_path=model, challenge=True)
    local = _write_jsonl(tmp_path / "docs.jsonl", docs)
    side = tmp_path / "docs.source_manifest.json"
    side.write_text(json.dumps({"num_docs": N_DOCS, "docs_val": 9, "shuffle_seed": 1337}))
    meta = prep.prepare_jsonl(local, tmp_path / "b", tokenizer_path=model, challenge=True)
    assert meta["n_docs"]["val"] == 9 and meta["docs_source_manifest"]["shuffle_seed"] == 1337
    side.write_text(json.dumps({"num_docs": N_DOCS + 1, "docs_val": 9}))
    with pytest.raises(UserError, match="num_docs=41"):
        prep.prepare_jsonl(local, tmp_path / "c", tokenizer_path=model, challenge=True)
    with pytest.raises(UserError, match="--tokenizer"):
        prep.prepare_jsonl(local, tmp_path / "d", challenge=True)


def test_published_sp1024_tokens(tmp_path):
    model = TOKENIZERS / "fineweb_1024_bpe.model"
    if not model.exists():
        pytest.skip("shared tokenizer models not present")
    docs = _docs(12, seed=3)
    src = _write_jsonl(tmp_path / "d.jsonl", docs)
    prep.prepare_jsonl(src, tmp_path / "out", tokenizer_path=model, val_docs=4, challenge=True)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    want = _expected_shards(sp, docs, 4, shards.SHARD_SIZE)
    assert [load_shard(p).tolist() for p in list_shards(tmp_path / "out", "train")] == want["train"]


def test_memory_stays_flat_as_the_input_grows(corpus, tmp_path, monkeypatch):
    """Peak traced allocations with 4x the documents stay within a small margin: nothing grows
    with the input but the fixed shard buffer (benchmarks/memory_flat.py measures RSS at 100 MB).
    Both inputs span several encode batches (two batches' ids are alive at a batch change), and
    the source is hashed in small blocks: file_sha256 reads 1 MB blocks, a bounded cost that
    inputs this small would otherwise see grow with them."""
    _, _, _, model, _ = corpus

    def sha256_small_blocks(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 14), b""):
                h.update(block)
        return h.hexdigest()

    monkeypatch.setattr(prep, "file_sha256", sha256_small_blocks)
    block = _docs(prep._ENCODE_BATCH_DOCS, seed=5)  # whole encode batches: both runs see the same batches
    peaks, sizes = [], []
    for k in (2, 2, 8):  # the first run warms up (lazy imports are not counted)
        src = _write_jsonl(tmp_path / f"d{len(sizes)}.jsonl", block * k + ["tail"])
        sizes.append(src.stat().st_size)
        tracemalloc.start()
        prep.prepare_jsonl(src, tmp_path / f"o{len(sizes)}", tokenizer_path=model, val_docs=1, challenge=True,
                           shard_size=4096)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    peaks, sizes = peaks[1:], sizes[1:]
    # holding the documents or their tokens would add at least the input's growth (~190 KB)
    assert abs(peaks[1] - peaks[0]) < 0.1 * (sizes[1] - sizes[0]), (peaks, sizes)
