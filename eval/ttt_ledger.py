"""Proof that per-document LoRA TTT is score-first and document-isolated.

Two checks over what `eval.ttt_lora` records while it runs:

* `check_events(events, context)` - the score-before-update check of `eval.ttt.check_score_before_update`,
  on the same ("score" | "update", tag, lo, hi) log (stream positions, inclusive), with the same
  verdicts and messages. Per-document TTT scores the documents longest first, so the scored
  positions are tens of thousands of disjoint intervals; this keeps them in a sorted list searched
  by bisection (O(log n) a check instead of a scan of the list), which a full FineWeb log
  (~10^6 events) needs. `tests/test_ttt_lora.py` checks that both checkers agree on random logs.

* `IsolationLedger` - "nothing carries across documents" (pg_mechanics.md §4.5.3: adapters are
  reset between documents). The adapter code reports each reset of a slot (one document's adapter
  state in a batch) *after verifying that the state is fresh* (B = 0, A = the shared start, a new
  optimizer), and every score and adapter update with the slot it used. A slot used for a document
  other than the one it was last reset for, an update that reads positions outside its document,
  or a score outside the document's targets, is a violation. A deliberately skipped reset shows up
  as the next document using a slot it was never reset for.

    ledger = IsolationLedger(starts, lengths)         # the documents: BOS position, target count
    ledger.reset(doc, slot); ledger.score(doc, slot, lo, hi); ledger.update(doc, slot, lo, hi)
    ledger.problems                                    # [] = isolated
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class IntervalSet:
    """Disjoint, non-adjacent inclusive integer intervals, sorted (two parallel lists)."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, lo: int, hi: int) -> bool:
        # the only candidate is the last interval starting at or before hi (ends increase too)
        i = bisect_right(self.starts, hi) - 1
        return i >= 0 and self.ends[i] >= lo

    def first_uncovered(self, lo: int, hi: int):
        """Smallest position in [lo, hi] outside every interval, or None."""
        i = bisect_right(self.starts, lo) - 1
        pos = self.ends[i] + 1 if i >= 0 and self.ends[i] >= lo else lo  # merged: a gap follows
        return pos if pos <= hi else None

    def add(self, lo: int, hi: int) -> None:
        j0 = bisect_left(self.ends, lo - 1)  # first interval touching or after lo
        j1 = bisect_right(self.starts, hi + 1)  # past the last one touching hi
        if j0 < j1:
            lo, hi = min(lo, self.starts[j0]), max(hi, self.ends[j1 - 1])
        self.starts[j0:j1] = [lo]
        self.ends[j0:j1] = [hi]


def check_events(events, context=()) -> list[str]:
    """Every violation of score-first ordering in an event log ([] = compliant): the verdicts of
    `eval.ttt.check_score_before_update`, for logs of any fragmentation.

    `context`: stream positions an update may read before they are scored, beside position 0
    (which that checker exempts). Per-document TTT passes the documents' opening BOS tokens: a
    document's window starts at its BOS, which is also the previous document's last target
    ("end of document", §2.5.1). Its value is fixed by construction (the documents are found by
    it, as in the records), and the model never sees stream positions, so reading it as the
    first input of the next document says nothing about an unscored target."""
    scored = IntervalSet()
    allowed = {int(p) for p in context}
    problems = []
    for kind, tag, lo, hi in events:
        if kind == "score":
            if scored.overlaps(lo, hi):
                problems.append(f"score {tag}: positions {lo}..{hi} include already scored ones")
            scored.add(lo, hi)
        elif kind == "update":
            gap = scored.first_uncovered(max(lo, 1), hi)
            while gap is not None and gap in allowed:
                gap = scored.first_uncovered(gap + 1, hi)
            if gap is not None:
                problems.append(f"update {tag}: trains on positions {lo}..{hi}, but position "
                                f"{gap} was not scored before it")
        else:
            raise ValueError(f"unknown event kind {kind!r}")
    return problems


class IsolationLedger:
    """Per-slot ownership of adapter state (module docstring). `starts[d]` is document d's first
    stream position (its BOS), `lengths[d]` its targets (positions starts[d]+1 .. starts[d]+lengths[d]).
    With `keep_log`, every call is also kept in `log` as (kind, doc, slot, lo, hi)."""

    def __init__(self, starts, lengths, keep_log: bool = False):
        self.starts = [int(s) for s in starts]
        self.lengths = [int(n) for n in lengths]
        self.owner: dict[int, int] = {}
        self.problems: list[str] = []
        self.log = [] if keep_log else None

    def _note(self, kind, doc, slot, lo=-1, hi=-1):
        if self.log is not None:
            self.log.append((kind, doc, slot, lo, hi))

    def reset(self, doc: int, slot: int) -> None:
        """Slot `slot` now holds fresh state for document `doc` (the caller verified it)."""
        self._note("reset", doc, slot)
        self.owner[slot] = doc

    def _owned(self, what: str, doc: int, slot: int) -> None:
        owner = self.owner.get(slot)
        if owner != doc:
            had = "never reset" if owner is None else f"last reset for document {owner}"
            self.problems.append(f"{what} of document {doc} used adapter slot {slot}, {had}: "
                                 f"its state may carry another document's training")

    def score(self, doc: int, slot: int, lo: int, hi: int) -> None:
        self._note("score", doc, slot, lo, hi)
        self._owned("a score", doc, slot)
        s, n = self.starts[doc], self.lengths[doc]
        if lo < s + 1 or hi > s + n:
            self.problems.append(f"document {doc} scored positions {lo}..{hi}, outside its targets "
                                 f"{s + 1}..{s + n}")

    def update(self, doc: int, slot: int, lo: int, hi: int) -> None:
        self._note("update", doc, slot, lo, hi)
        self._owned("an update", doc, slot)
        s, n = self.starts[doc], self.lengths[doc]
        if lo < s or hi > s + n:
            self.problems.append(f"the adapter of document {doc} trained on positions {lo}..{hi}, "
                                 f"outside the document ({s}..{s + n})")
