"""tiktoken as a second tokenizer family: a small byte-level BPE written as a `.tiktoken` file in
the test, by path and by name (a constructor registered for the test, its file in a temporary
tiktoken cache); exact byte tables; prepare -> load_data with the ranks stored beside the shards;
the clear errors (missing BPE file by name never downloads, too wide for uint16, no pattern)."""

import base64
import hashlib
import random
import socket

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

import pipeline.data.prepare as prep
from eval.byte_tables import ByteTables
from pipeline.data import tiktoken_file
from pipeline.data.shards import list_shards, load_shard
from pipeline.data.tiktoken_tokenizer import load_tiktoken
from pipeline.errors import UserError

# gpt2's split regex (tiktoken_ext.openai_public.r50k_pat_str), written out so the test needs no BPE file
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b" and", b"  "]
RANKS = [bytes([b]) for b in range(256)] + MERGES
URL = "https://example.invalid/encodings/pgolf_tiny.tiktoken"


def _bpe_text(ranks=RANKS) -> bytes:
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in enumerate(ranks))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection in these tests is a failure: pgolf must never download a BPE file."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def bpe_file(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(_bpe_text())
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "tiktoken_cache"
    d.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(d))
    return d


@pytest.fixture
def registered(monkeypatch):
    """Encoding "pgolf_tiny" registered as tiktoken plugins register theirs, its file at URL."""
    sha = hashlib.sha256(_bpe_text()).hexdigest()

    def pgolf_tiny():
        return {"name": "pgolf_tiny", "pat_str": PATTERN, "special_tokens": {"<|endoftext|>": len(RANKS)},
                "mergeable_ranks": tiktoken.load.load_tiktoken_bpe(URL, expected_hash=sha)}

    tiktoken.list_encoding_names()  # fills the registry
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "pgolf_tiny", pgolf_tiny)


def _texts(n=40, seed=0):
    rng = random.Random(seed)
    words = ["the", "thing", "and", "an", "in", "  ", "caf\u00e9", "\u20ac5", "\U0001f600", "\u6f22\u5b57", "x\u00b2",
             "\t", "\n", "\r\n", "<|endoftext|>", "3.14", "don't"]
    return ["".join(rng.choice(words) + rng.choice([" ", "", "  "]) for _ in range(rng.randint(0, 30)))
            for _ in range(n)]


def test_reads_the_file_as_tiktoken_does(bpe_file, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's reader then copies nothing into a cache
    theirs = tiktoken.load.load_tiktoken_bpe(str(bpe_file))
    ours = tiktoken_file.read_ranks(bpe_file)
    assert {tok: rank for rank, tok in enumerate(ours)} == theirs
    by_id = tiktoken_file.token_bytes_by_id(bpe_file)
    assert by_id[:4] == [None] * 4 and by_id[4 + 256] == b"th"


def test_ids_are_ranks_plus_four_and_bytes_are_exact(bpe_file):
    tok = load_tiktoken(bpe_file, pattern=PATTERN)
    enc = tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks={t: r for r, t in enumerate(RANKS)},
                            special_tokens={})
    assert tok.vocab_size() == len(RANKS) + 4 and tok.bos_id() == 1
    tables = tok.byte_tables()
    assert tables.base_bytes[:4].tolist() == [0, 0, 0, 0] and tables.is_boundary[:4].all()
    assert not tables.has_leading_space.any()
    for text in _texts():
        ids = tok.encode(text)
        assert ids == [r + 4 for r in enc.encode_ordinary(text)]
        stream = torch.tensor([1] + ids)
        assert tables.count_bytes(stream) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode(["the thing", ""]) == [tok.encode("the thing"), []]


def test_from_token_bytes_pads_and_refuses_giant_tokens():
    t = ByteTables.from_token_bytes([None, b"ab", b"\xe2\x82\xac"], vocab_size=5)
    assert t.base_bytes.tolist() == [0, 2, 3, 0, 0]
    assert t.is_boundary.tolist() == [True, False, False, True, True]
    with pytest.raises(UserError, match="shorter tokens"):
        ByteTables.from_token_bytes([b"x" * 40000])


def test_prepare_then_load_data_scores_raw_bytes(bpe_file, tmp_path):
    from conftest import tiny_recipe
    from pipeline.stages.evaluate import load_data

    src = tmp_path / "docs.jsonl"
    import json

    texts = _texts(60, seed=1)
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    meta = prep.prepare_jsonl(src, out, tokenizer_path=str(bpe_file), val_docs=10, tiktoken_pattern="r50k_base")
    assert meta["tokenizer_kind"] == "tiktoken" and meta["vocab_size"] == len(RANKS) + 4
    assert meta["val_roundtrip_exact"] and meta["lossless"]
    assert meta["tiktoken_pattern"] != "r50k_base"  # the regex borrowed from r50k_base, without its BPE file
    assert (out / "tokenizer.model").read_bytes() == bpe_file.read_bytes()
    tok = load_tiktoken(bpe_file, pattern="r50k_base")
    want = np.concatenate([[1] + tok.encode(t) for t in texts[:10]])
    val = np.concatenate([load_shard(p) for p in list_shards(out, "val")])
    assert val.tolist() == want.tolist()
    assert tiktoken_file.tokenizer_kind(out, out / "tokenizer.model") == "tiktoken"
    data = load_data(out, tiny_recipe(f"model.vocab_size={len(RANKS) + 4}", "data.max_val_tokens=0"))
    assert data.val_stream_bytes == meta["val_raw_bytes"] == sum(len(t.encode()) for t in texts[:10])
    with pytest.raises(UserError, match="model.vocab_size: 271"):
        load_data(out, tiny_recipe("model.vocab_size=320"))


def test_encoding_by_name_from_the_cache(cache, registered):
    with pytest.raises(UserError) as e:
        load_tiktoken("tiktoken:pgolf_tiny")
    msg = str(e.value)
    assert URL in msg and "never downloads" in msg and str(cache) in msg
    (cache / hashlib.sha1(URL.encode()).hexdigest()).write_bytes(_bpe_text())
    tok = load_tiktoken("tiktoken:pgolf_tiny")
    assert tok.source == "pgolf_tiny" and tok.pattern == PATTERN and tok.vocab_size() == len(RANKS) + 4
    assert tok.encode("the thing") == [262, 36, 260, 266]  # "the" | " " "th" "ing": ranks + 4


def test_missing_published_encoding_is_a_user_error_not_a_download(cache):
    for name in ("cl100k_base", "gpt2"):
        with pytest.raises(UserError, match="never downloads") as e:
            load_tiktoken(f"tiktoken:{name}")
        assert "openaipublic.blob.core.windows.net" in str(e.value)
    assert not list(cache.iterdir())
    with pytest.raises(UserError, match="unknown tiktoken encoding"):
        load_tiktoken("tiktoken:no_such_encoding")


def test_clear_errors(bpe_file, tmp_path):
    with pytest.raises(UserError, match="--tiktoken-pattern"):
        load_tiktoken(bpe_file)
    wide = tmp_path / "wide.tiktoken"
    wide.write_bytes(_bpe_text() + base64.b64encode(b"zzzz") + b" 65532\n")
    with pytest.raises(UserError, match="uint16"):
        load_tiktoken(wide, pattern=PATTERN)
    holes = tmp_path / "holes.tiktoken"
    holes.write_bytes(_bpe_text(RANKS[:200] + MERGES))
    with pytest.raises(UserError, match="0xc8"):
        load_tiktoken(holes, pattern=PATTERN)
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"not base64!! x\n")
    with pytest.raises(UserError, match="bad.tiktoken:1"):
        load_tiktoken(bad, pattern=PATTERN)
    with pytest.raises(UserError, match="not found"):
        load_tiktoken(tmp_path / "absent.tiktoken", pattern=PATTERN)
