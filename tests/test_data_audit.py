"""`pgolf data audit`: validation documents found in training (also across shard boundaries), the
published validation count, byte sidecars, meta.json, and the command's exit status. Shards are
written here token by token, so every expected count is known exactly."""

import json

import pytest

from pipeline.data import audit, identity
from pipeline.data.audit import audit_data
from pipeline.data.shards import sidecar_name, write_shard
from pipeline.errors import UserError
from pipeline.fileio import file_sha256
from test_cli import cli_inprocess

B = 1  # BOS
VAL_DOCS = [[10, 11, 12], [20, 21], [], [30, 31, 32, 33], [40]]  # [] is an empty document
# Training: val doc 1 copied whole inside shard 0; val doc 3 copied across the shard 0/1 boundary;
# an empty document (not leakage); a near copy of val doc 0 (one token more, not the same document).
TRAIN = [B, 50, 51, B, 20, 21, B, 10, 11, 12, 13, B, B, 30, 31] + [32, 33, B, 60, 61, 62, B, 70]


def _stream(docs):
    return [t for d in docs for t in [B] + d]


def _write(d, val=None, train=None, prefix="data", train_cut=15):
    d.mkdir(parents=True, exist_ok=True)
    write_shard(d / f"{prefix}_val_000000.bin", _stream(VAL_DOCS) if val is None else val)
    train = TRAIN if train is None else train
    write_shard(d / f"{prefix}_train_000000.bin", train[:train_cut])
    write_shard(d / f"{prefix}_train_000001.bin", train[train_cut:])
    return d


def test_overlap_found_within_and_across_shards(tmp_path):
    d = _write(tmp_path / "d")
    r = audit_data(d)
    assert (r.val_docs, r.val_empty_docs, r.train_docs, r.train_empty_docs) == (5, 1, 7, 1)
    assert (r.val_tokens, r.train_tokens) == (15, len(TRAIN))
    assert r.overlap_docs == 2 and r.overlap_fraction == pytest.approx(0.4)
    first, second = r.examples
    assert (first.val_doc, str(first.val_place), str(first.train_place), first.head) == (
        1, "data_val_000000.bin:4", "data_train_000000.bin:3", (20, 21))
    assert (second.val_doc, str(second.val_place), str(second.train_place), second.n_tokens) == (
        3, "data_val_000000.bin:8", "data_train_000000.bin:12", 4)
    assert not r.passed and "2 of 5 validation documents" in r.problems[0]
    lines = r.lines()
    assert "overlap_docs=2 overlap_fraction=0.400000" in lines and lines[-1] == "data_audit FAIL"
    quiet = audit_data(d, max_examples=0)
    assert quiet.examples == [] and "val doc 1 at data_val_000000.bin:4, in training at " \
        "data_train_000000.bin:3" in quiet.problems[0]


def test_clean_split_passes_and_cli_exit_codes(tmp_path):
    clean = [B, 50, 51, B, 10, 11, 12, 13, B, 30, 31, 32]  # no val document, only a longer one
    d = _write(tmp_path / "d", train=clean, train_cut=5)
    r = audit_data(d, max_examples=1)
    assert r.passed and r.overlap_docs == 0 and r.examples == []
    assert r.published.startswith("unknown") and r.sidecar == "absent"
    ok = cli_inprocess("data", "audit", str(d), cwd=tmp_path)
    assert ok.returncode == 0 and "overlap_docs=0" in ok.stdout and "data_audit PASS" in ok.stdout
    bad = cli_inprocess("data", "audit", str(_write(tmp_path / "leaky")), cwd=tmp_path)
    assert bad.returncode == 1 and "overlap val_doc=1 val_at=data_val_000000.bin:4" in bad.stdout
    missing = cli_inprocess("data", "audit", str(tmp_path / "absent"), cwd=tmp_path)
    assert missing.returncode == 2 and "error: data directory" in missing.stderr


def test_a_split_must_start_with_bos(tmp_path):
    d = _write(tmp_path / "d", val=[10] + _stream(VAL_DOCS))
    r = audit_data(d)
    assert any("before any BOS" in p for p in r.problems)


def test_published_validation_count(tmp_path, monkeypatch):
    d = _write(tmp_path / "d", prefix="fineweb")
    tok = d / "tokenizer.model"
    tok.write_bytes(b"stand-in for a challenge tokenizer")
    sha = file_sha256(tok)
    monkeypatch.setattr(audit, "tokenizer_vocab_size", lambda data_dir, tok: 1024)  # the stand-in has no pieces
    monkeypatch.setitem(identity.CHALLENGE_TOKENIZERS, sha, ("sp1024", (14,)))  # 15 val tokens = 14 targets
    clean = [B, 50, 51, B, 60]
    r = audit_data(_write(tmp_path / "d", prefix="fineweb", train=clean, train_cut=3))
    assert r.passed and r.published.startswith("sp1024 match"), r.lines()
    monkeypatch.setitem(identity.CHALLENGE_TOKENIZERS, sha, ("sp1024", (62_021_632,)))
    r = audit_data(d)
    assert r.published == "mismatch (sp1024)" and any("62,021,632" in p for p in r.problems)


def test_byte_sidecars(tmp_path):
    d = _write(tmp_path / "d", train=[B, 50, 51, B, 60], train_cut=3)
    counts = [0, 1, 1, 2, 0, 3, 1, 0, 0, 1, 1, 1, 1, 0, 4]
    write_shard(d / sidecar_name("data", 0), counts)
    r = audit_data(d)
    assert r.passed and r.sidecar.startswith("present") and "16 bytes" in r.sidecar
    write_shard(d / sidecar_name("data", 0), [5] + counts[1:])  # bytes on a BOS
    r = audit_data(d)
    assert r.sidecar == "broken" and "a BOS" in r.problems[0]
    write_shard(d / sidecar_name("data", 0), counts[:-1])  # one count short
    r = audit_data(d)
    assert r.sidecar == "broken" and "14 counts" in r.problems[0]


def test_meta_json_and_a_prepared_directory(tmp_path):
    """End to end on `prepare_jsonl` output: a document repeated after the validation cut is found."""
    from pipeline.data.prepare import prepare_jsonl
    from conftest import small_text
    from pipeline.data.tokenizer import train_tokenizer

    docs = [f"document number {i} says {'hello ' * (i % 5)}" for i in range(30)]
    docs[25] = docs[2]  # validation document 2 again in training
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    model = train_tokenizer(small_text()[:20000], 320, tmp_path / "t.model")
    out = tmp_path / "out"
    prepare_jsonl(src, out, tokenizer_path=model, val_docs=5)
    r = audit_data(out)
    assert r.overlap_docs == 1 and r.examples[0].val_doc == 2 and len(r.problems) == 1
    meta = json.loads((out / "meta.json").read_text())
    meta["n_docs"]["train"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    r = audit_data(out)
    assert any("records train_docs=26" in p for p in r.problems)


def test_broken_shard_is_a_user_error(tmp_path):
    d = _write(tmp_path / "d")
    (d / "data_train_000001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="data_train_000001.bin"):
        audit_data(d)


def test_a_token_id_beyond_the_tokenizer_is_found_in_either_split(small_data, tmp_path):
    """A shard id the tokenizer does not have (here 60000 >= 320) fails the audit, naming the shard."""
    import shutil

    import numpy as np

    r = audit_data(small_data)
    assert r.passed and r.vocab_size == 320 and 0 < r.max_token_id["train"][0] < 320
    assert f"vocab_size=320 val_max_token_id={r.max_token_id['val'][0]} " \
           f"train_max_token_id={r.max_token_id['train'][0]}" in r.lines()
    for split in ("train", "val"):
        d = tmp_path / split
        shutil.copytree(small_data, d)
        shard = sorted(d.glob(f"*_{split}_*.bin"))[-1]
        with open(shard, "r+b") as f:
            f.seek(1024)
            f.write(np.array([60000], dtype=np.uint16).tobytes())
        r = audit_data(d)
        assert r.max_token_id[split] == (60000, shard) and not r.passed
        assert [p for p in r.problems if f"{shard.name} ({split}) holds token id 60000" in p
                and "has 320 ids" in p]
