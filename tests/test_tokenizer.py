"""The lossless SentencePiece BPE: exact round trips, byte fallback, the '▁' piece, checks."""

import random
from pathlib import Path

import pytest

from pipeline.data.tokenizer import (
    TokenizerSpec,
    check_vocab,
    chunk_safe,
    is_lossless,
    load_tokenizer,
    normalizer_name,
    tokenizer_spec,
    train_tokenizer,
)
from pipeline.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCAB = 400


def synthetic_text(n_lines=600, seed=0):
    """Deterministic English-like lines with indentation, tabs, double spaces and accents."""
    rng = random.Random(seed)
    words = "the king queen shall thou art my lord and of to in what say café naïve good night".split()
    lines = []
    for i in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        if i % 5 == 0:
            line = "    " + line
        if i % 7 == 0:
            line = line.replace(" ", "  ", 1) + "\t!"
        lines.append(line + rng.choice([".", ",", ";", "?"]))
        if i % 4 == 3:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = train_tokenizer(synthetic_text(), VOCAB, tmp_path_factory.mktemp("tok") / "t.model")
    return load_tokenizer(path)


TRICKY = "  Lead\tand\t\ttabs   three\n\nblank line above\r\nCRLF café ＦＵＬＬ ﬁ x² trailing  \n"


def test_round_trip_tricky_text(sp):
    assert sp.vocab_size() == VOCAB
    assert sp.decode(sp.encode(TRICKY)) == TRICKY
    text = synthetic_text(seed=1)
    assert sp.decode(sp.encode(text)) == text


def test_standalone_space_piece_and_no_inner_spaces(sp):
    space = sp.piece_to_id("\u2581")
    assert space != sp.unk_id()
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert not [p for p in pieces if "\u2581" in p[1:]]
    # A run of spaces is one '▁' token per space, so the challenge byte table counts it exactly.
    assert sp.encode("a    b", out_type=str)[1:4] == ["\u2581"] * 3


def test_byte_fallback_for_unseen_characters(sp):
    for ch in ["€", "😀"]:
        pieces = sp.encode(ch, out_type=str)
        assert pieces == [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
        assert sp.decode(sp.encode(ch)) == ch
    assert sp.unk_id() not in sp.encode("€ 😀 漢")


def test_special_ids_and_determinism(sp, tmp_path):
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    a = train_tokenizer(synthetic_text(), VOCAB, tmp_path / "a.model").read_bytes()
    assert a == sp.serialized_model_proto()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lossless_flags(sp):
    assert normalizer_name(sp) == "identity"
    assert is_lossless(sp)
    assert chunk_safe(sp)
    assert tokenizer_spec(sp) == TokenizerSpec(
        normalizer="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=True,
        treat_whitespace_as_suffix=False, split_by_whitespace=True, byte_fallback=True)


def _spm_model(**options):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    args = dict(model_type="bpe", vocab_size=300, hard_vocab_limit=False, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic_text(200).splitlines()), model_writer=buf,
                                   **{**args, **options})
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def test_spec_reads_proto2_defaults_and_set_fields():
    # sentencepiece's defaults: nmt_nfkc, dummy prefix, trimming, escaped spaces, split words
    assert tokenizer_spec(_spm_model()) == TokenizerSpec(
        normalizer="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True, escape_whitespaces=True,
        treat_whitespace_as_suffix=False, split_by_whitespace=True, byte_fallback=False)
    odd = _spm_model(treat_whitespace_as_suffix=True, split_by_whitespace=False, normalization_rule_name="identity",
                     byte_fallback=True, remove_extra_whitespaces=False)
    assert tokenizer_spec(odd) == TokenizerSpec(
        normalizer="identity", add_dummy_prefix=True, remove_extra_whitespaces=False, escape_whitespaces=True,
        treat_whitespace_as_suffix=True, split_by_whitespace=False, byte_fallback=True)


def test_chunk_safe_needs_no_dummy_prefix_and_no_inner_space():
    lossless = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True)
    assert chunk_safe(_spm_model(add_dummy_prefix=False, **lossless))
    assert is_lossless(_spm_model(add_dummy_prefix=True, **lossless))  # round-trips, but ...
    assert not chunk_safe(_spm_model(add_dummy_prefix=True, **lossless))  # ... each part gains a "▁"
    assert not chunk_safe(_spm_model(add_dummy_prefix=False, treat_whitespace_as_suffix=True, **lossless))


def test_challenge_sp1024_is_lossy():
    model = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    if not model.exists():
        pytest.skip("shared reference folder not present")
    challenge = load_tokenizer(model)
    assert normalizer_name(challenge) == "nmt_nfkc"
    assert not is_lossless(challenge) and not chunk_safe(challenge)
    spec = tokenizer_spec(challenge)
    assert (spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.split_by_whitespace) == (False, True, True)


def test_check_vocab_message(sp):
    check_vocab(sp, VOCAB, "x.model")
    with pytest.raises(UserError) as e:
        check_vocab(sp, 1024, "data/tokenizer.model")
    msg = str(e.value)
    assert "data/tokenizer.model" in msg and str(VOCAB) in msg and "1024" in msg
    assert "model.vocab_size" in msg


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.model"):
        load_tokenizer(bad)


def test_text_too_small_for_vocab(tmp_path):
    with pytest.raises(UserError, match="smaller vocab_size"):
        train_tokenizer("tiny text here\n", 2000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
