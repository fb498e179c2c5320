"""CaseOps: the records' lossless case transform, and the per-token raw-byte sidecar it needs.

CaseOps (`lossless_caps_caseops_v1`, PR #1729; read in R/2026-04-18_PR1626_CaseOps_Taper/
lossless_caps.py and R/2026-04-27_..._1.0611/prepare_caseops_data.py; pg_mechanics.md §2.7, §4.9)
rewrites ASCII capitalisation as four private-use markers, so a tokenizer reuses lowercase pieces
across case variants. Over each maximal run of ASCII letters (a "word"):

* a lowercase word is unchanged;
* an ALLCAPS word of two or more letters becomes ALLCAPS + the lowercase word;
* a TitleCase word (an uppercase letter, then one or more lowercase) becomes TITLE + lowercase;
* any other word with capitals (a single capital, "iPhone", "McDonald") is spelt letter by letter:
  TITLE first if its first letter is a capital, then CAPNEXT before every later capital;
* a marker character already in the text is escaped as ESC + the character.

Markers: TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004, user-defined symbols of the
tokenizer (single pieces). `decode(encode(t)) == t` for every string t (tests/test_caseops.py).

bpb must count the raw text's bytes, not the transformed text's (a marker is 3 UTF-8 bytes of no
raw byte), so the validation split ships a sidecar: one uint16 per token, the raw bytes it stands
for (`token_raw_bytes`: markers, ESC and BOS 0, an escaped marker its 3 bytes, everything else its
own UTF-8 bytes - ASCII letters are one byte in either case). With a lossless tokenizer (pgolf's
default) the sidecar of a document sums to the document's raw UTF-8 length exactly. With a
normalizing tokenizer (the records' CaseOps sp8192 uses nmt_nfkc, as the challenge's own) each
token counts the raw bytes of its normalized surface, the records' convention, and the total is
that of the normalized text, as the byte tables count it for any lossy tokenizer.

    t = encode(raw); raw == decode(t)
    check_tokenizer(sp)                           # UserError unless the markers are single pieces
    table = PieceBytes(sp)
    counts, exact = table.raw_bytes(ids, t)       # per token of sp.encode(t); exact: decodes to t
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.errors import UserError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
MARKERS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAME = "caseops_v1"  # meta.json's text_transform (the records' lossless_caps_caseops_v1)
IDENTITY = "identity"
_SPACE = "\u2581"

# A word holding a capital (only these change: lowercase words are skipped by the regex engine,
# which matters on gigabytes of training text), or a marker character to escape. The lookbehind
# keeps matches at word starts; the possessive [a-z]*+ cannot backtrack ([a-z] and [A-Z] differ).
_ENCODE_RE = re.compile(r"(?<![A-Za-z])[a-z]*+[A-Z][A-Za-z]*+|[\ue001-\ue004]")


def _encode_match(m: re.Match) -> str:
    word = m.group(0)
    if word in MARKERS:
        return ESC + word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and word[1:].islower():  # "".islower() is False: a lone capital is below
        return TITLE + lower
    out = [TITLE] if word[0].isupper() else []
    out.append(lower[0])
    for ch, lo in zip(word[1:], lower[1:]):
        if ch.isupper():
            out.append(CAPNEXT)
        out.append(lo)
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps transform of `text` (module docstring)."""
    return _ENCODE_RE.sub(_encode_match, text)


class CaseOpsError(UserError):
    """A string that is not a CaseOps transform (a marker where none can be)."""


def _alpha(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def decode(text: str) -> str:
    """The raw text behind a CaseOps transform; CaseOpsError for a malformed one. A character loop
    (checks and tools; `prepare` verifies round trips in the transformed domain instead)."""
    out: list[str] = []
    escaped = False
    mode = None  # "title" | "allcaps": waits for the next word's first letter
    capnext = False  # the next letter is a capital
    in_word = allcaps = False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped = in_word = allcaps = False  # an escaped character is never a letter
            continue
        if ch == ESC:
            if mode or capnext:
                raise CaseOpsError("a case marker is followed by an escape instead of a letter")
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if mode or capnext or in_word:
                raise CaseOpsError("a word marker inside a word or after another marker")
            mode = "title" if ch == TITLE else "allcaps"
        elif ch == CAPNEXT:
            if capnext or mode:
                raise CaseOpsError("CAPNEXT after another marker")
            capnext = True
        elif _alpha(ch):
            if not in_word:
                allcaps = mode == "allcaps"
                up = mode is not None or capnext
                mode, in_word = None, True
            else:
                up = allcaps or capnext
            out.append(ch.upper() if up else ch)
            capnext = False
        else:
            if mode or capnext:
                raise CaseOpsError("a case marker is not followed by a letter")
            out.append(ch)
            in_word = allcaps = False
    if escaped or mode or capnext:
        raise CaseOpsError("the text ends inside a marker sequence")
    return "".join(out)


def check_tokenizer(sp, source) -> None:
    """UserError unless `sp` keeps each marker as one piece (a user-defined symbol: the records'
    tokenizer reserves them) and adds no dummy prefix (which the sidecar cannot count)."""
    from eval.sp_model import tokenizer_spec

    missing = [f"U+{ord(m):04X}" for m in MARKERS if sp.encode(m) != [sp.piece_to_id(m)] or sp.is_unknown(
        sp.piece_to_id(m))]
    if missing:
        raise UserError(f"{source} has no single piece for the CaseOps markers {', '.join(missing)}; leave out "
                        "--tokenizer to train one on the transformed text, or pass a CaseOps tokenizer (the "
                        "records' fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)")
    if tokenizer_spec(sp).add_dummy_prefix:
        raise UserError(f"{source} adds a dummy prefix; the CaseOps byte sidecar needs add_dummy_prefix=false")


class PieceBytes:
    """Each SentencePiece id's bytes in the (normalized) text it decodes to: byte pieces one byte,
    control and unknown pieces none, "▁" a space."""

    def __init__(self, sp):
        table = []
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                table.append(b"")
            elif sp.is_byte(i):
                table.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                table.append(sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8"))
        self.table = table
        self.lengths = np.array([len(b) for b in table], dtype=np.int64)

    def raw_bytes(self, ids, transformed: str) -> tuple[np.ndarray, bool]:
        """Raw bytes per token of `ids` (= sp.encode(transformed), no BOS) as uint16, and whether
        the tokens decode to exactly `transformed` (then the counts sum to the raw UTF-8 length)."""
        ids = np.asarray(ids, dtype=np.int64)
        surface = b"".join(self.table[i] for i in ids.tolist())
        return _token_counts(surface, self.lengths[ids]), surface == transformed.encode("utf-8")


def _token_counts(surface: bytes, token_lengths: np.ndarray) -> np.ndarray:
    """Raw bytes of each token, given the transformed surface they spell and each one's share of it.
    A character's raw bytes go to the token holding its first byte (a character split into byte
    pieces counts once); unescaped markers and ESC count 0."""
    b = np.frombuffer(surface, dtype=np.uint8)
    weight = np.zeros(b.size, dtype=np.int64)
    lead = (b & 0xC0) != 0x80
    weight[lead] = np.select([b[lead] < 0x80, b[lead] < 0xE0, b[lead] < 0xF0], [1, 2, 3], 4)
    # markers are U+E001..U+E004: EE 80 81..84
    cand = np.flatnonzero(b[:-2] == 0xEE) if b.size >= 3 else np.zeros(0, dtype=np.int64)
    cand = cand[(b[cand + 1] == 0x80) & (b[cand + 2] >= 0x81) & (b[cand + 2] <= 0x84)]
    literal = -1  # position of a marker that an ESC made literal
    for p in cand.tolist():
        if p == literal:
            continue  # escaped: keeps its own 3 bytes
        weight[p] = 0
        if b[p + 2] == 0x84:  # ESC: the next character is literal, whatever it is
            literal = p + 3
    ends = np.cumsum(token_lengths)
    cum = np.concatenate([[0], np.cumsum(weight)])
    counts = cum[ends] - cum[ends - token_lengths]
    if counts.size and counts.max() > np.iinfo(np.uint16).max:
        raise UserError("a token stands for more than 65,535 raw bytes; the sidecar format is uint16")
    return counts.astype(np.uint16)
