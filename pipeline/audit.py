"""The causality / legality audit behind `pgolf audit RECIPE` (seed_components.md §1.3).

    from pipeline.audit import audit_recipe, format_failure
    report = audit_recipe(load_recipe("sidecar48"))
    print("\\n".join(report.lines()))          # one PASS/FAIL line per test
    if not report.passed: print(format_failure(report))

`audit_recipe` shrinks the recipe's model to d=64 with every part still switched on
(`shrink_model_config`), gives every zero-initialised or constant parameter small random values
so that every path carries signal (`randomize_zero_params`, as the PR audits in seed_prs.md
§2.4 / §3.4 did), and runs `audit_model` in eval mode, fp32, on CPU-sized inputs:

- future_perturbation@k (k = 1, T/2, T-1): re-draw every token at positions >= k; logits at < k
  must not move.
- jacobian: d(sum of logits at t) / d(token-embedding output at s > t) must be zero, for
  t = k - 1 (the same k). It sees only differentiable paths: a leak behind detach() needs test 1.
- prefix_consistency: the model on x[:, :k] must equal the full run's first k positions.
- statelessness: f(B) after f(A) must equal f(B) on a pristine copy; an eval forward must leave
  every parameter and buffer bit-identical.
- batch_independence: re-drawing rows 1.. must not move row 0.

Deviations are max |difference| divided by max |reference|, so `tol` is relative. When a test
fails, the same pair of inputs is re-run with hooks on every submodule and the first place in
execution order where the protected slice diverges is named as the culprit (`_find_culprit`).
`check_target_alignment` is the data-path check (test 6): targets are inputs shifted by one.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config import ModelConfig, Recipe
from pipeline.model.parts.rotary import RopeConfig
from pipeline.model.compose import read_keys, replace_model
from pipeline.model.registry import build_model

Selector = Callable[[torch.Tensor, torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class AuditResult:
    test: str
    passed: bool
    max_dev: float
    detail: str = ""
    culprit: Optional[str] = None
    position: Optional[int] = None

    def line(self) -> str:
        s = f"{self.test} {'PASS' if self.passed else 'FAIL'} max_dev={self.max_dev:.3e}"
        if not self.passed:
            s += f" culprit={self.culprit or 'unknown'}"
            s += f" position={self.position}" if self.position is not None else ""
        return s


@dataclass
class AuditReport:
    recipe: str
    results: list[AuditResult]
    model_causal_flag: bool  # what the model claims (`LanguageModel.causal`)
    config: Optional[ModelConfig] = None  # the shrunken config actually audited
    randomized: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def lines(self) -> list[str]:
        return [r.line() for r in self.results]


# ----------------------------------------------------------------------------- model prep


def _shrink_rope(rope: RopeConfig, old_head_dim: int, new_head_dim: int) -> RopeConfig:
    if rope.dims == 0 or rope.dims >= old_head_dim:
        return replace(rope, dims=0)
    # Partial RoPE must stay partial, or the position-free channels (PR #315) go unaudited:
    # keep the rotated fraction, even, at least 2 and at most head_dim - 2.
    dims = 2 * round(new_head_dim * rope.dims / old_head_dim / 2)
    return replace(rope, dims=max(2, min(dims, new_head_dim - 2)))


def shrink_model_config(cfg: ModelConfig) -> ModelConfig:
    """A d=64 version of `cfg` that keeps every part on (same layers, passes and flags). Only the
    settings the model reads are shrunk: the others must keep their defaults (build_model)."""
    dim, heads = 64, 4
    kv = 2 if cfg.num_kv_heads < cfg.num_heads else heads  # keep GQA exercised iff it was on
    reads = read_keys(cfg)
    shrunk = {}
    if "rope" in reads:
        shrunk["rope"] = _shrink_rope(cfg.rope, cfg.model_dim // cfg.num_heads, dim // heads)
    if "bigram" in reads and cfg.bigram:
        shrunk["bigram"] = replace(cfg.bigram, buckets=64, dim=16)
    if "sidecar" in reads and cfg.sidecar:
        shrunk["sidecar"] = replace(cfg.sidecar, hidden=8)
    if "recurrent" in reads:
        rec = cfg.recurrent
        shrunk["recurrent"] = replace(rec, k_rank=min(rec.k_rank, 8), td_rank=min(rec.td_rank, 8),
                                      gru_rank=min(rec.gru_rank, 8))
    return replace_model(cfg, model_dim=dim, num_heads=heads, num_kv_heads=kv,
                         vocab_size=min(cfg.vocab_size, 256), **shrunk)


@torch.no_grad()
def randomize_zero_params(model: nn.Module, seed: int = 0, std: float = 0.05) -> list[str]:
    """Add N(0, std^2) to every parameter holding an exact zero or a single repeated value.

    Zero-initialised projections, gates and tables (and all-ones gains) would otherwise hide a
    leaking path: a leak multiplied by zero is invisible. Returns the names it changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for name, p in model.named_parameters():
        if p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        constant = flat.numel() > 1 and bool((flat == flat[0]).all())
        if constant or bool((flat == 0).any()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.add_(noise.to(device=p.device, dtype=p.dtype))
            changed.append(name)
    return changed


# ----------------------------------------------------------------------------- comparison


def _rel_dev(ref: torch.Tensor, other: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    diff = (ref.double() - other.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def _worst_position(ref: torch.Tensor, other: torch.Tensor) -> int:
    """Position (dim 1) of the largest |difference| in [B, T, ...] tensors."""
    diff = (ref.double() - other.double()).abs()
    return int(diff.reshape(diff.size(0), diff.size(1), -1).amax(dim=(0, 2)).argmax())


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a module's output or arguments (tuples/lists/dicts one level deep)."""
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else (obj,)
    return [t.detach().clone() for t in items if torch.is_tensor(t)]


def _trace(model: nn.Module, ids: torch.Tensor) -> list[tuple]:
    """Run `model(ids)`, recording (kind, module name, call number, tensors) in execution order.

    A pre-hook records a module's inputs ("in") when it starts and a forward hook its outputs
    ("out") when it ends, so a leak inside a module can be told from one in its caller. The
    call number pairs up the calls of a module that runs several times (shared blocks)."""
    events: list[tuple] = []
    calls: dict = {}

    def record(kind, name, obj):
        calls[kind, name] = calls.get((kind, name), 0) + 1
        events.append((kind, name, calls[kind, name], _tensors(obj)))

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: record("in", n, a)))
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: record("out", n, o)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return events


def _find_culprit(model_a: nn.Module, ids_a: torch.Tensor, model_b: nn.Module,
                  ids_b: torch.Tensor, select: Selector, tol: float) -> tuple[Optional[str], str]:
    """Name the first module (execution order) whose protected slice differs between two runs.

    `select(ta, tb)` returns the comparable protected slices of a tensor from run a and its
    twin from run b, or None when the tensor has no batch/position axes to compare on."""
    ev_b = {(kind, name, n): ts for kind, name, n, ts in _trace(model_b, ids_b)}
    stack: list[str] = []  # the modules running at this point of run a
    opaque_changed: Optional[str] = None  # last module whose position-less output changed
    for kind, name, n, ts_a in _trace(model_a, ids_a):
        for ta, tb in zip(ts_a, ev_b.get((kind, name, n), [])):
            pair = select(ta, tb)
            if pair is None:
                if kind == "out" and ta.shape == tb.shape and not torch.equal(ta, tb):
                    opaque_changed = name
                continue
            dev = _rel_dev(*pair)
            if dev <= tol:
                continue
            if kind == "out":
                return name, f"`{name}` output first diverges (rel dev {dev:.2e}) while its inputs agree"
            if opaque_changed is not None:
                return opaque_changed, (f"`{opaque_changed}` produced a changed output without a position "
                                        f"axis that reached `{name}` (rel dev {dev:.2e})")
            where = stack[-1] if stack else type(model_a).__name__
            return where, f"the input of `{name}` already diverges: leak in the forward code of `{where}`"
        if kind == "in":
            stack.append(name)
        elif stack and stack[-1] == name:
            stack.pop()
    return None, "no hooked module output diverges; the leak is in the trunk's own forward code"


# ----------------------------------------------------------------------------- the battery


@contextlib.contextmanager
def _one_thread():
    # The audited matrices are tiny: one thread is faster than several fighting over cores
    # (a 192x64 QR took 0.37 s on two busy threads, 4 ms on one), and it keeps each kernel's
    # reduction order fixed from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def audit_model(model: nn.Module, vocab_size: int, seq_len: int = 32, batch: int = 3,
                seed: int = 0, tol: float = 1e-6) -> list[AuditResult]:
    """Run the battery on `model` (left untouched: every forward uses a fresh copy of it)."""
    if vocab_size < 2 or seq_len < 4 or batch < 2:
        raise ValueError("audit needs vocab_size >= 2, seq_len >= 4 and batch >= 2")
    with _one_thread():
        b = _Battery(model, vocab_size, seq_len, batch, seed, tol)
        return [*b.future(), b.jacobian(), b.prefix(), b.stateless(), b.batch()]


class _Battery:
    """The tests on one model: shared tokens, a pristine copy, and the culprit search."""

    def __init__(self, model, vocab_size, T, B, seed, tol):
        self.pristine = copy.deepcopy(model).float().eval()
        self.device = next(self.pristine.parameters()).device
        self.gen = torch.Generator().manual_seed(seed)
        self.V, self.T, self.B, self.tol = vocab_size, T, B, tol
        self.ks = sorted({1, T // 2, T - 1})
        self.x = self.tokens()
        self.base = self.run(self.x)

    def tokens(self) -> torch.Tensor:
        return torch.randint(0, self.V, (self.B, self.T), generator=self.gen).to(self.device)

    def redraw(self, mask: torch.Tensor) -> torch.Tensor:
        """x with every token under `mask` changed (a non-zero shift mod V: none stays equal)."""
        shift = torch.randint(1, self.V, self.x.shape, generator=self.gen).to(self.device)
        return torch.where(mask.to(self.device), (self.x + shift) % self.V, self.x)

    def future_mask(self, k: int) -> torch.Tensor:
        return torch.arange(self.T)[None, :].expand(self.B, self.T) >= k

    def before(self, k: int) -> Selector:
        """Compare positions < k of two same-shaped [B, T, ...] tensors; skip anything else."""
        def select(a, b):
            ok = a.shape == b.shape and a.dim() >= 2 and a.shape[:2] == (self.B, self.T)
            return (a[:, :k], b[:, :k]) if ok else None
        return select

    def fresh(self, src: Optional[nn.Module] = None) -> nn.Module:
        # A new copy for every forward, so a stateful part is blamed by statelessness alone.
        return copy.deepcopy(self.pristine if src is None else src)

    def run(self, ids, m: Optional[nn.Module] = None, src: Optional[nn.Module] = None) -> torch.Tensor:
        with torch.no_grad():
            return (self.fresh(src) if m is None else m)(ids).double()

    def culprit(self, ids_a, ids_b, select, mb=None, src=None):
        mb = self.fresh(src) if mb is None else mb
        return _find_culprit(self.fresh(src), ids_a, mb, ids_b, select, self.tol)

    def result(self, test, a, b, ok_detail, blame) -> AuditResult:
        """Compare logits a (reference) and b; on failure ask `blame()` for (culprit, detail)."""
        dev = _rel_dev(a, b)
        if dev <= self.tol:
            return AuditResult(test, True, dev, ok_detail)
        name, detail = blame()
        return AuditResult(test, False, dev, detail, name, _worst_position(a, b))

    def future(self) -> list[AuditResult]:
        out = []
        for k in self.ks:
            xp = self.redraw(self.future_mask(k))
            out.append(self.result(
                f"future_perturbation@{k}", self.base[:, :k], self.run(xp)[:, :k],
                f"tokens >= {k} re-drawn; logits < {k} unchanged",
                lambda: self.culprit(self.x, xp, self.before(k))))
        return out

    def jacobian(self) -> AuditResult:
        m = self.fresh()
        emb = getattr(m, "tok_emb", None)
        if not isinstance(emb, nn.Module):
            return AuditResult("jacobian", False, float("nan"), "model has no `tok_emb` to differentiate at")
        m.requires_grad_(False)
        leaves: list[torch.Tensor] = []

        def make_leaf(mod, args, out):
            # Swap the embedding output for a leaf so each position's gradient can be read.
            leaves.append(out.detach().float().requires_grad_(True))
            return leaves[-1]

        handle = emb.register_forward_hook(make_leaf)
        worst, worst_t, reached = 0.0, 0, False
        try:
            with torch.enable_grad():
                logits = m(self.x)
                # Rows t = k - 1 of the perturbation test, one backward pass each: all T rows
                # cost T passes, most of the audit's time, for little extra cover.
                for t in (k - 1 for k in self.ks):
                    grads = [g for g in torch.autograd.grad(logits[:, t].sum(), leaves, retain_graph=True,
                                                            allow_unused=True) if g is not None]
                    reached |= bool(grads)
                    leak = max((g[:, t + 1:].abs().max().item() for g in grads), default=0.0)
                    scale = max((g[:, :t + 1].abs().max().item() for g in grads), default=0.0)
                    dev = leak / scale if scale > 0 else leak
                    if dev > worst:
                        worst, worst_t = dev, t
        finally:
            handle.remove()
        if worst <= self.tol:
            why = "no gradient from logits[t] reaches embeddings after t" if reached else \
                "vacuous: no gradient reaches the `tok_emb` output"
            return AuditResult("jacobian", True, worst, why)
        # The perturbation pair at k = t + 1 shows which part carries the gradient.
        xp = self.redraw(self.future_mask(worst_t + 1))
        name, detail = self.culprit(self.x, xp, self.before(worst_t + 1))
        return AuditResult("jacobian", False, worst, f"d logits[{worst_t}] / d emb[>{worst_t}] != 0; {detail}",
                           name, worst_t)

    def prefix(self) -> AuditResult:
        # The only test whose two runs differ in shape, so fp32 kernels round differently
        # (2.6e-7 at 9 layers: too close to tol). In float64 that noise is ~1e-15, and a real
        # dependence on T stands out. Parts that cannot run in float64 stay fp32.
        try:
            src = self.fresh().double()
            self.run(self.x[:, :2], src=src)
        except (RuntimeError, TypeError):
            src = None
        full = self.run(self.x, src=src)
        runs = {k: self.run(self.x[:, :k], src=src) for k in self.ks}
        k = max(self.ks, key=lambda k: _rel_dev(full[:, :k], runs[k]))

        def select(a, b):  # a from the prefix run, b from the full run
            ok = a.dim() >= 2 and a.shape[:2] == (self.B, k) and b.shape == (self.B, self.T, *a.shape[2:])
            return (a, b[:, :k]) if ok else None

        def blame():
            name, detail = self.culprit(self.x[:, :k], self.x, select, src=src)
            return name, f"prefix length {k} ({'fp32' if src is None else 'float64'}): {detail}"

        return self.result("prefix_consistency", full[:, :k], runs[k],
                           "prefixes of length 1, T/2, T-1 match the full run", blame)

    def stateless(self) -> AuditResult:
        xa = self.tokens()
        used = self.fresh()
        self.run(xa, used)  # f(A), then f(B) on the same copy
        fresh, after = self.run(self.x), self.run(self.x, used)
        dev = _rel_dev(fresh, after)
        # Every parameter and buffer must be bit-identical after two eval forwards.
        before = self.pristine.state_dict()
        moved = [n for n, t in used.state_dict().items()
                 if n not in before or before[n].shape != t.shape or not torch.equal(t, before[n])]
        if dev <= self.tol and not moved:
            return AuditResult("statelessness", True, dev, "f(B) after f(A) equals fresh f(B); state unchanged")
        name, detail, pos = moved[0].rpartition(".")[0] if moved else None, "", None
        if dev > self.tol:
            after_a = self.fresh()
            self.run(xa, after_a)  # a copy in the "after A" state; trace B on it and on a fresh one
            name, detail = self.culprit(self.x, self.x, lambda a, b: (a, b) if a.shape == b.shape else None,
                                        mb=after_a)
            pos = _worst_position(fresh, after)
        if moved:  # a moved tensor with unchanged logits still fails: the next call may differ
            detail = "; ".join(filter(None, [detail, f"eval forward changed {', '.join(moved[:4])}"]))
        return AuditResult("statelessness", False, dev, detail, name, pos)

    def batch(self) -> AuditResult:
        xb = self.redraw(torch.arange(self.B)[:, None].expand(self.B, self.T) > 0)

        def select(a, b):
            return (a[:1], b[:1]) if a.shape == b.shape and a.dim() >= 1 and a.shape[0] == self.B else None

        return self.result("batch_independence", self.base[:1], self.run(xb)[:1],
                           "rows 1.. re-drawn; row 0 unchanged", lambda: self.culprit(self.x, xb, select))


# ----------------------------------------------------------------------------- recipes


def audit_recipe(recipe: Recipe, seq_len: int = 32, seed: int = 0, tol: float = 1e-6) -> AuditReport:
    """Build the recipe's model shrunk to d=64, randomise its dormant paths, run the battery."""
    cfg = shrink_model_config(recipe.model)
    # A private RNG stream: the audit is reproducible and leaves the caller's seed alone.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"), _one_thread():
        torch.manual_seed(seed)
        model = build_model(cfg).float().eval()
    changed = randomize_zero_params(model, seed)
    results = audit_model(model, cfg.vocab_size, seq_len=seq_len, seed=seed, tol=tol)
    return AuditReport(recipe.name, results, bool(getattr(model, "causal", True)), cfg, changed)


_MEANING = {
    "future_perturbation": "lets earlier positions see later tokens",
    "jacobian": "passes gradient from later embeddings into earlier logits",
    "prefix_consistency": "makes outputs depend on the window length",
    "statelessness": "carries state between calls",
    "batch_independence": "mixes rows of the batch",
}


def format_failure(report: AuditReport) -> str:
    """A readable account of what failed: which part, which test, which position."""
    failed = [r for r in report.results if not r.passed]
    if not failed:
        return ""
    lines = [f"audit of {report.recipe!r} failed {len(failed)} of {len(report.results)} tests:"]
    for r in failed:
        part = f"part `{r.culprit}`" if r.culprit else "an unidentified part"
        at = f" at position {r.position}" if r.position is not None else ""
        meaning = _MEANING[r.test.split("@")[0]]
        lines.append(f"  {r.test}: {part} {meaning}{at} (max_dev={r.max_dev:.2e}). {r.detail}")
    if report.model_causal_flag:
        lines.append("The model claims to be causal, so this is an unflagged violation: fix the part "
                     "before training or scoring with it.")
    else:
        lines.append("The model declares causal=False: a known leak reproduced on purpose behind its flag; "
                     "every report marks its runs non-causal.")
    return "\n".join(lines)


def check_target_alignment(x: torch.Tensor, y: torch.Tensor) -> None:
    """Assert y[:, t] == x[:, t + 1] for every t < T - 1 (test 6: next-token targets)."""
    x2, y2 = (x[None], y[None]) if x.dim() == 1 else (x, y)
    if x2.shape != y2.shape:
        raise AssertionError(f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} differ in shape")
    bad = (y2[:, :-1] != x2[:, 1:]).nonzero()
    if len(bad):
        row, t = (int(v) for v in bad[0])
        raise AssertionError(f"targets are not inputs shifted by one: row {row}, t={t}: "
                             f"y={int(y2[row, t])} but x[t+1]={int(x2[row, t + 1])} "
                             f"({len(bad)} mismatches)")

