"""Batched per-document LoRA adapters on any pgolf model, for per-document TTT (eval.ttt_lora).

The records' `BatchedTTTLoRA` (R/2026-04-10_VarLenAttn onward, pg_mechanics.md §4.5.3; read in
R/2026-04-14_MultiPhaseGlobalSGD_PhasedTTT/train_gpt.py, `BatchedLinearLoRA`, `forward_ttt`)
gives every document of a batch its own rank-r adapter pair on Q, K, V, the attention output, the
MLP output and the LM head: delta(x) = scale * (x A_b^T) B_b^T for row b, A_b [r, in] uniform in
±1/sqrt(in), B_b [out, r] zero, so a fresh adapter changes nothing. The records rewrite the model's
forward to add them; here they attach to an unmodified model through forward hooks, so every
trunk and part works:

* `ttt.lora_targets` (a regular expression, matched in full against module names) picks modules
  whose forward takes x [B, T, in] first and returns [B, T, out]; the adapter adds delta(x) to
  the module's output. With the default `blocks.N.attn.c_q|c_k|c_v` (the Q/K/V projections),
  `blocks.N.attn` (in parallel with the whole attention: the records' "O" adapter, on the same
  normed input) and `blocks.N.mlp` (the records' MLP adapter) this is the records' set.
* A module called several times per forward (a looped or depth-recurrent block) gets a separate
  adapter per call, as the records give looped layers one per pass. A probe forward on random
  tokens (never validation data: the compile-warm-up rule of PR #1530) records the calls and
  shapes; every later forward must make the same calls, or it is an error.
* `ttt.lora_head`: the LM head adapter, added to the logits before the soft-cap. Models expose no
  head module (the head is tied to the embedding), so this path computes the logits itself from
  `model.hidden(ids)` as softcap(h W^T + delta(h)), with W the (tied) head weight and the cap
  `model.config.logit_softcap`; the probe checks that with zero adapters this reproduces
  `model(ids)`, and refuses the model otherwise. It also evaluates the head only at the scored
  positions (a chunk of 48 out of a 2,048-token window), which the full forward cannot.

The output scale is alpha / rank (PR #1767; alpha = rank gives the 04-14 record's scale 1).

Isolation: every document starts from the SAME state, A = A0 (drawn once from the recipe seed,
identical on every rank) and B = 0, with a new optimizer; `fresh()` verifies that before reporting
the reset to the ledger. (The records redraw A at each reset; one shared draw has the same
distribution and makes a document's score independent of its batch, its rank and the queue.)
PR #1767's TTT_WARM_START_A (A kept across documents) is deliberately not offered:
it carries adapter state from one document to the next.

    lora = BatchedLoRA(model, ttt_cfg, device, seed)          # probes the model (random tokens)
    with lora.attached():
        state = lora.fresh(batch_docs, ledger)                # one slot per document
        logits = lora.logits(ids, state, rows, slab)          # [n, C, V] at the chunk positions
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from pipeline.config import TTTConfig
from pipeline.errors import UserError

_PROBE_LEN = 8
_PROBE_ROWS = 2
# Zero adapters must reproduce model(ids) through the head path; float32 on CPU agrees to ~1e-6.
_HEAD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Site:
    """One adapter: the `call`-th call of module `name` in a forward, x [.., in] -> [.., out]."""

    name: str
    call: int
    d_in: int
    d_out: int


class AdapterState:
    """A batch's adapter weights: for site i, A[i] [bsz, r, in] and B[i] [bsz, out, r] (fp32
    leaves), plus the head's pair when the head is adapted. `rows` (set per forward) selects the
    documents of the batch that the forward runs."""

    def __init__(self, a, b, head_a, head_b, scale: float):
        self.a, self.b, self.head_a, self.head_b = a, b, head_a, head_b
        self.scale = scale
        self.rows = None

    def parameters(self) -> list[torch.Tensor]:
        extra = [] if self.head_a is None else [self.head_a, self.head_b]
        return [*self.a, *self.b, *extra]

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.index_select(0, self.rows), b.index_select(0, self.rows)
        return (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype) * self.scale


class BatchedLoRA:
    """The adapters of `ttt.lora_targets` (and the head) on `model`: discovered once, attached by
    hooks, a fresh `AdapterState` per batch of documents."""

    def __init__(self, model, cfg: TTTConfig, device, seed: int):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.rank = cfg.lora_rank
        self.scale = (cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank) / cfg.lora_rank
        try:
            pattern = re.compile(cfg.lora_targets)
        except re.error as e:
            raise UserError(f"ttt.lora_targets {cfg.lora_targets!r} is not a regular expression: {e}") from None
        self.modules = {n: m for n, m in model.named_modules() if n and pattern.fullmatch(n)}
        if not self.modules:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise UserError(f"ttt.lora_targets {cfg.lora_targets!r} matches no module of the model; its modules "
                            f"are named like {names}")
        # the logits' soft-cap when the head is adapted (None: no head adapter)
        self.head_cap = self._head_cap() if cfg.lora_head else None
        self.sites = self._probe()
        self.index = {(s.name, s.call): i for i, s in enumerate(self.sites)}
        # A0, one per site, the same on every rank and for every document (seeded on the CPU).
        g = torch.Generator().manual_seed(int(seed))

        def a0(d_in):
            bound = 1.0 / math.sqrt(d_in)
            return (torch.rand(self.rank, d_in, generator=g, dtype=torch.float32) * 2 - 1).mul_(bound)

        self.a0 = [a0(s.d_in).to(self.device) for s in self.sites]
        self.head_a0 = a0(self.head_dims[0]).to(self.device) if self.head_cap is not None else None
        self.state = None  # the AdapterState the hooks read; None: the plain model
        self._calls: dict[str, int] = {}

    # ---- discovery -------------------------------------------------------------------------

    def _head_cap(self) -> float:
        model = self.model
        if not callable(getattr(model, "hidden", None)) or not hasattr(model, "config"):
            raise UserError(f"ttt.lora_head: the model ({type(model).__name__}) has no hidden(ids) method, so its "
                            "logits cannot take a head adapter; set ttt.lora_head: false")
        return model.config.logit_softcap

    def _head_weight(self) -> torch.Tensor:
        head = getattr(self.model, "lm_head", None)
        return head.weight if head is not None else self.model.tok_emb.weight

    def _probe(self) -> list[Site]:
        """Run one forward on random tokens, recording each target module's calls and shapes."""
        seen: list[tuple[str, int, tuple, tuple]] = []
        counts: dict[str, int] = {}
        problems: list[str] = []

        def recorder(name):
            def hook(module, args, output):
                x = args[0] if args else None
                ok = (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.ndim == 3
                      and output.ndim == 3 and x.shape[:2] == output.shape[:2] and x.shape[0] == _PROBE_ROWS)
                if not ok:
                    got = (tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__,
                           tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__)
                    problems.append(f"{name}: input {got[0]} -> output {got[1]}")
                    return None
                seen.append((name, counts.get(name, 0), tuple(x.shape), tuple(output.shape)))
                counts[name] = counts.get(name, 0) + 1
                return None
            return hook

        vocab = self._vocab()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (_PROBE_ROWS, _PROBE_LEN), generator=g).to(self.device)
        was_training = self.model.training
        self.model.eval()
        handles = []
        try:
            with torch.no_grad():
                ref = self.model(ids).float() if self.head_cap is not None else None
                handles = [m.register_forward_hook(recorder(n)) for n, m in self.modules.items()]
                if self.head_cap is not None:
                    h = self.model.hidden(ids)
                    mine = self._head_logits(h, None)
                    self.head_dims = (h.shape[-1], vocab)
                    err = float((mine - ref).abs().max()) if mine.shape == ref.shape else math.inf
                    if not err <= _HEAD_TOLERANCE:
                        raise UserError(
                            "ttt.lora_head: the model's logits are not softcap(hidden(ids) @ W^T) with its head "
                            f"weight and model.logit_softcap (max difference {err:.3g}), so a head adapter cannot be "
                            "added exactly; set ttt.lora_head: false")
                else:
                    self.model(ids)
        finally:
            for hd in handles:
                hd.remove()
            self.model.train(was_training)
        if problems:
            raise UserError("ttt.lora_targets: an adapter needs a module taking x [batch, time, in] and returning "
                            f"[batch, time, out]; these do not: {problems[:4]}. Narrow ttt.lora_targets")
        missing = sorted(set(self.modules) - set(counts))
        if missing:
            raise UserError(f"ttt.lora_targets matches modules the forward never calls: {missing[:6]}; narrow it")
        self.expected_calls = counts
        return [Site(n, c, xs[-1], ys[-1]) for n, c, xs, ys in seen]

    def _vocab(self) -> int:
        emb = getattr(self.model, "tok_emb", None)
        if emb is not None:
            return int(emb.num_embeddings)
        return int(self.model.config.vocab_size)

    # ---- state -----------------------------------------------------------------------------

    def fresh(self, docs, ledger=None) -> AdapterState:
        """New adapter state for a batch of documents (slot i = docs[i]): A = A0, B = 0 in every
        slot. Verified, then each slot's reset is reported to `ledger`."""
        bsz = len(docs)

        def pair(a0, d_out):
            a = a0.unsqueeze(0).repeat(bsz, 1, 1).requires_grad_(True)
            b = torch.zeros(bsz, d_out, self.rank, device=self.device, requires_grad=True)
            return a, b

        pairs = [pair(a0, s.d_out) for a0, s in zip(self.a0, self.sites)]
        head_a = head_b = None
        if self.head_cap is not None:
            head_a, head_b = pair(self.head_a0, self.head_dims[1])
        state = AdapterState([p[0] for p in pairs], [p[1] for p in pairs], head_a, head_b, self.scale)
        # The evidence behind each reset: the state really is the shared start, nothing else.
        starts = [*self.a0] + ([self.head_a0] if self.head_cap is not None else [])
        a_all = state.a + ([head_a] if head_a is not None else [])
        b_all = state.b + ([head_b] if head_b is not None else [])
        with torch.no_grad():
            fresh_ok = all(bool((a == a0.unsqueeze(0)).all()) for a, a0 in zip(a_all, starts)) \
                and all(not bool(b.any()) for b in b_all)
        if not fresh_ok:
            raise RuntimeError("new LoRA state differs from the shared start")  # a bug, not input
        if ledger is not None:
            for slot, doc in enumerate(docs):
                ledger.reset(int(doc), slot)
        return state

    # ---- forward ---------------------------------------------------------------------------

    def _hook(self, name):
        def hook(module, args, output):
            state = self.state
            if state is None:
                return None
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            i = self.index.get((name, call))
            if i is None:
                raise RuntimeError(f"module {name} was called more often than in the probe forward; per-call "
                                   "adapters need the same calls in every forward")
            return output + state.delta(args[0], state.a[i], state.b[i]).to(output.dtype)
        return hook

    @contextlib.contextmanager
    def attached(self):
        """The hooks, for the duration (the model runs plainly while `self.state` is None)."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for hd in handles:
                hd.remove()
            self.state = None

    def _head_logits(self, h: torch.Tensor, state) -> torch.Tensor:
        z = h @ self._head_weight().to(h.dtype).t()
        if state is not None:
            z = z + state.delta(h, state.head_a, state.head_b).to(z.dtype)
        z = z.float()
        cap = self.head_cap
        return z if cap <= 0 else cap * torch.tanh(z / cap)

    def logits(self, ids: torch.Tensor, state: AdapterState, rows: torch.Tensor,
               slab: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, C, V] at window positions `slab` [n, C] of `ids` [n, T], row k of
        the batch being document `rows[k]` of `state`."""
        state.rows = rows
        self.state, self._calls = state, {}
        try:
            if self.head_cap is not None:
                h = self.model.hidden(ids)
                h = h.gather(1, slab.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
                out = self._head_logits(h, state)
            else:
                full = self.model(ids)
                out = full.gather(1, slab.unsqueeze(-1).expand(-1, -1, full.shape[-1])).float()
        finally:
            self.state = None
        if self._calls != self.expected_calls:
            raise RuntimeError(f"the forward called the adapted modules {self._calls}, the probe "
                               f"{self.expected_calls}; per-call adapters need the same calls every time")
        return out
