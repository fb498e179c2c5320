"""A SentencePiece model's settings, read from its serialized proto without the protobuf package.

    spec = tokenizer_spec(sp)     # TokenizerSpec(normalizer="identity", add_dummy_prefix=False, ...)

The byte tables (eval.byte_tables) depend on how a model spells text: its normalizer, whether it
adds a dummy prefix or trims whitespace, where it puts "▁". protobuf is not a dependency (and the
submission script bundles this module), and only a few scalars are needed, so the wire format is
walked by hand. Field numbers: sentencepiece_model.proto (ModelProto 2 = TrainerSpec,
3 = NormalizerSpec); absent proto2 fields take their defaults.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from pipeline.errors import UserError


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, object]]:
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


class TokenizerSpec(NamedTuple):
    """The settings of a SentencePiece model that decide how its pieces spell the text."""

    normalizer: str  # NormalizerSpec.name: "identity", "nmt_nfkc", ...
    add_dummy_prefix: bool  # a "▁" is put before (or, as a suffix, after) every text
    remove_extra_whitespaces: bool  # leading/trailing spaces dropped, runs collapsed to one
    escape_whitespaces: bool  # spaces are spelled "▁" in pieces
    treat_whitespace_as_suffix: bool  # "▁" ends a word's piece instead of starting it
    split_by_whitespace: bool  # pieces never span a "▁" (other than their leading/trailing one)
    byte_fallback: bool  # unseen characters become <0xNN> pieces instead of <unk>


# proto2 defaults of the fields above when the model does not store them
_NORMALIZER_FIELDS = {1: ("normalizer", ""), 3: ("add_dummy_prefix", True),
                      4: ("remove_extra_whitespaces", True), 5: ("escape_whitespaces", True)}
_TRAINER_FIELDS = {24: ("treat_whitespace_as_suffix", False), 22: ("split_by_whitespace", True),
                   35: ("byte_fallback", False)}


def tokenizer_spec(sp) -> TokenizerSpec:
    """Read the TokenizerSpec fields from the model's serialized proto (absent fields take their
    proto2 defaults). Raises UserError if the proto cannot be parsed."""
    values = {name: default for name, default in (*_NORMALIZER_FIELDS.values(), *_TRAINER_FIELDS.values())}
    try:
        for number, value in _proto_fields(sp.serialized_model_proto()):
            fields = {3: _NORMALIZER_FIELDS, 2: _TRAINER_FIELDS}.get(number)
            if fields is None:
                continue
            for inner_number, inner in _proto_fields(value):
                if inner_number in fields:
                    name = fields[inner_number][0]
                    values[name] = inner.decode("utf-8") if name == "normalizer" else bool(inner)
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the settings of this SentencePiece model ({e}); "
                        f"pass a .model file written by sentencepiece.") from None
    return TokenizerSpec(**values)
