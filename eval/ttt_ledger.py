"""Proof that per-document LoRA TTT is score-first and document-isolated.

Two checks over what `eval.ttt_lora` records while it runs:

* score before update: `eval.ttt.check_score_before_update(events, context=documents' BOS
  positions)`, the one checker every TTT mode's ("score" | "update", tag, lo, hi) log goes through.

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
