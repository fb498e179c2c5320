"""Byte sidecars end to end (issue 9, item 4; pg_mechanics.md §1.2, §2.7).

A CaseOps-like export is built here: a bijective transform (a Capitalised word becomes the
marker U+E001 + the lowercase word), a tokenizer trained on the transformed text with the
marker as a user-defined symbol, val shards of the transformed text, and the sidecar
`data_val_bytes_000000.bin` holding each token's raw (pre-transform) UTF-8 bytes, computed
from decoded prefixes of the stream, not from the byte tables. `load_data` must pick the
sidecar up; then the bytes every score divides by are the raw text's, while the tables alone
would count the transformed text (3 bytes per marker).
"""

from __future__ import annotations

import io
import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

from eval.byte_tables import ByteTables
from eval.scorer import evaluate
from eval.ttt import score_first_ttt
from pipeline.config import EvalConfig, TTTConfig
from pipeline.data.shards import shard_name, sidecar_name, write_shard
from pipeline.errors import UserError
from pipeline.stages.evaluate import load_data

TITLE = "\ue001"
BOS = 1
VOCAB = 320
WORDS = "the cat of dog and to in is was his her not but it an paris london".split()


def transform(text: str) -> str:
    """Capitalised word -> TITLE + lowercase word; everything else unchanged (bijective on
    text without TITLE whose words are all lowercase or Capitalised)."""
    return re.sub(r"\b[A-Z][a-z]*\b", lambda m: TITLE + m.group(0).lower(), text)


def inverse(text: str) -> str:
    return re.sub(TITLE + r"([a-z])", lambda m: m.group(1).upper(), text)


def _docs(seed, n):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words = [w.capitalize() if rng.random() < 0.3 else w for w in words]
        docs.append(" ".join(words) + rng.choice([".", "!", " ", "\n"]))
    return docs


def _raw_token_bytes(sp, ids):
    """Raw UTF-8 bytes each token stands for: the growth of the raw text behind the decoded
    prefix of the document as each token is added (TITLE is 3 UTF-8 bytes of no raw byte)."""
    def raw_len(prefix):
        return len(prefix.encode("utf-8")) - 3 * prefix.count(TITLE)

    out, before = [], 0
    for k in range(1, len(ids) + 1):
        now = raw_len(sp.decode(ids[:k]))
        out.append(now - before)
        before = now
    return out


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(transform(d) for d in _docs(0, 600)), model_writer=buf, model_type="bpe",
        vocab_size=VOCAB, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=[TITLE], character_coverage=1.0,
        hard_vocab_limit=False, pad_id=0, bos_id=BOS, eos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    (root / "tokenizer.model").write_bytes(buf.getvalue())
    val_docs = _docs(1, 60)
    tokens, counts = [], []
    for doc in val_docs:
        t = transform(doc)
        assert inverse(t) == doc
        ids = sp.encode(t)
        assert sp.decode(ids) == t
        tokens += [BOS] + ids
        counts += [0] + _raw_token_bytes(sp, ids)
    write_shard(root / shard_name("data", "val", 0), tokens)
    write_shard(root / sidecar_name("data", 0), counts)
    write_shard(root / shard_name("data", "train", 0), [BOS] + sp.encode(transform(" ".join(_docs(2, 50)))))
    raw = sum(len(d.encode("utf-8")) for d in val_docs)
    (root / "meta.json").write_text(json.dumps({"val_raw_bytes": raw}))
    return root, np.array(tokens), np.array(counts), raw


def _recipe(max_val_tokens=0):
    eval_cfg = EvalConfig(seq_len=32, mode="sliding", stride=16, batch_seqs=8)
    return SimpleNamespace(model=SimpleNamespace(vocab_size=VOCAB), data=SimpleNamespace(max_val_tokens=max_val_tokens),
                           eval=eval_cfg)


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.w[ids]


def test_sidecar_is_the_denominator(caseops_dir):
    root, tokens, counts, raw = caseops_dir
    assert counts.sum() == raw  # the sidecar stands for the raw text ...
    data = load_data(root, _recipe())
    assert data.byte_source == "sidecar" and data.tables.byte_source == "sidecar"
    assert data.val_byte_counts.tolist() == counts.tolist()
    assert data.val_stream_bytes == raw == data.val_raw_bytes
    # ... while the table formula counts the transformed text: 3 bytes per TITLE marker
    plain = ByteTables(data.tables.base_bytes, data.tables.has_leading_space, data.tables.is_boundary)
    n_markers = int((tokens == spm.SentencePieceProcessor(
        model_file=str(root / "tokenizer.model")).piece_to_id(TITLE)).sum())
    assert n_markers > 20
    assert plain.count_bytes(tokens) == raw + 3 * n_markers

    cfg = _recipe().eval
    n = ((len(tokens) - 1) // cfg.seq_len) * cfg.seq_len + 1  # eval truncation
    res = evaluate(Bigram(), data.val_tokens, data.tables, cfg, "cpu")
    assert res.byte_count == int(counts[1:n].sum())
    ttt = TTTConfig(enabled=True, chunk_tokens=128, epochs=1, optimizer="sgd", lr=0.01, batch_seqs=2)
    res = score_first_ttt(Bigram(), data.val_tokens, data.tables, cfg, ttt, "cpu")
    assert res.byte_count == int(counts[1:n].sum())


def test_max_val_tokens_truncates_the_sidecar_too(caseops_dir):
    root, _, counts, _ = caseops_dir
    data = load_data(root, _recipe(max_val_tokens=100))
    assert len(data.val_tokens) == len(data.val_byte_counts) == 101
    assert data.val_stream_bytes == int(counts[1:101].sum())
    assert data.val_raw_bytes is None


def test_a_sidecar_of_other_shards_is_refused(caseops_dir, tmp_path):
    root, _, counts, _ = caseops_dir
    for f in root.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    write_shard(tmp_path / sidecar_name("data", 0), counts[:-1])
    with pytest.raises(UserError, match="counts but data_val_000000.bin has"):
        load_data(tmp_path, _recipe())
    shifted = np.concatenate([[3], counts[:-1]])  # off by one: a BOS gets bytes
    write_shard(tmp_path / sidecar_name("data", 0), shifted)
    with pytest.raises(UserError, match="a BOS"):
        load_data(tmp_path, _recipe())
