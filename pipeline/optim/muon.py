"""Muon: momentum followed by Newton–Schulz orthogonalisation, for 2-D weight matrices.

Muon (Keller Jordan, modded-nanogpt; adopted by the Parameter Golf baseline and every record
since, pg_mechanics.md §3.3) replaces each matrix's Nesterov-momentum update by an approximation
of its nearest semi-orthogonal matrix, so that every singular direction of the update moves by a
similar amount instead of a few dominant ones taking all the step.

Per parameter, per step:
    b <- mu*b + g                       (momentum buffer)
    d <- g + mu*b  (Nesterov) or b
    u <- newton_schulz(d) * sqrt(max(1, rows/cols))
    p <- p * (1 - lr*wd)                (decoupled weight decay, before the update; §4.7.2)
    p <- p - lr*u

Use:
    opt = Muon(matrices, lr=0.04, momentum=0.95, weight_decay=0.04)
    loss.backward(); opt.step(); opt.zero_grad()

Distributed (torchrun; gradients must already be averaged across ranks, e.g. by DDP): pass
`rank` and `world_size`. Parameter i belongs to rank i % world_size; each rank orthogonalises only
its own share into one flat buffer (zeros elsewhere) and a single all-reduce(SUM) hands every rank
every update, so the replicas stay identical while the Newton–Schulz cost is split. Momentum
buffers therefore exist only on the owning rank.

Speed: the momentum, Nesterov and weight-update arithmetic of a group runs as multi-tensor
(`torch._foreach_*`) ops, the same elementwise formulas as one tensor at a time (bitwise equal on
the CPU, where they loop over the same kernels); one process skips the flat buffer. `compile_ns=True`
(`optim.muon_compile`, on with CUDA by default) runs Newton–Schulz through `torch.compile`, as the
baseline and the records do; the first steps then compile it once per matrix shape.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

# The quintic's coefficients (a, b, c), tuned by Keller Jordan so that one fixed polynomial
# pushes singular values in (0, 1] quickly towards ~1 (they end in a band around 1, not at 1).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (fast tensor-core matmuls, as the records do); float32 elsewhere, because
    bf16 matmul on CPU is both slow and noticeably less precise."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Approximately orthogonalise G (last two dims; leading dims are a batch): `steps` iterations
    of Keller Jordan's (a, b, c) = NS_COEFFS (`newton_schulz_sequence`). Returns a tensor of `dtype`
    (default by device, see `default_ns_dtype`) whose singular values lie roughly in [0.5, 1.5].
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    if steps < 1:
        raise ValueError(f"newton_schulz needs steps >= 1, got {steps}")
    return newton_schulz_sequence(G, (NS_COEFFS,) * steps, eps=eps, dtype=dtype)


def newton_schulz_sequence(G: torch.Tensor, coeffs, eps: float = 1e-7,
                           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Newton-Schulz with one (a, b, c) per iteration: X <- aX + (bA + cA^2)X with A = X X^T, after
    scaling X to unit Frobenius norm (which bounds its spectral norm by 1, inside the polynomial's
    basin). A tall matrix is transposed first so A is the smaller Gram matrix. One tuple repeated is
    Keller Jordan's iteration; a tuple per step is Polar Express (pipeline.optim.muon_variants)."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz_sequence needs a matrix, got shape {tuple(G.shape)}")
    if not coeffs:
        raise ValueError("newton_schulz_sequence needs at least one (a, b, c)")
    X = G.to(dtype or default_ns_dtype(G.device))
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    batched = X.ndim > 2
    # addmm/baddbmm fuse the scale-and-add into the matmul: beta*input + alpha*(m1 @ m2).
    for a, b, c in coeffs:
        A = X @ X.mT
        if batched:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        else:
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for parameters with ndim >= 2 (trailing dims are flattened into columns).

    Group keys: lr, momentum, nesterov, ns_steps, weight_decay (all may be changed between steps;
    `pipeline.optim.schedule.apply_schedule` sets lr and momentum). `ns_dtype` None picks the
    Newton–Schulz dtype from the parameters' device. `orthogonalise` replaces `newton_schulz` (same
    signature; Polar Express and MuonEq-R from pipeline.optim.muon_variants); None keeps it.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        ns_dtype: Optional[torch.dtype] = None,
        compile_ns: bool = False,
        orthogonalise: Optional[Callable] = None,
    ):
        if lr < 0:
            raise ValueError(f"Muon lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Muon needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    # A vector has no useful "orthogonal" direction; such tensors belong to Adam.
                    raise ValueError(f"Muon takes only matrices; got a tensor of shape {tuple(p.shape)}")
        self.rank = rank
        self.world_size = world_size
        self.ns_dtype = ns_dtype
        # The orthogonaliser, newton_schulz's signature: newton_schulz unless a variant is given
        # (Polar Express, row normalisation: pipeline.optim.muon_variants.orthogonaliser).
        self._ns_fn = orthogonalise or newton_schulz
        self._ns = self._ns_fn
        if compile_ns:
            self.compile_newton_schulz()

    def compile_newton_schulz(self) -> None:
        """Run Newton–Schulz through torch.compile from the next step on (compiled lazily, per shape)."""
        if not hasattr(torch, "compile"):
            raise RuntimeError("optim.muon_compile needs torch.compile (PyTorch >= 2.0)")
        self._ns = torch.compile(self._ns_fn)

    @property
    def ns_compiled(self) -> bool:
        return self._ns is not self._ns_fn

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = self.world_size > 1
        if distributed and not (dist.is_available() and dist.is_initialized()):
            # Without the all-reduce each rank would apply only its own share: silent divergence.
            raise RuntimeError("Muon was given world_size > 1 but torch.distributed is not initialised")
        for group in self.param_groups:
            self._step_group(group, distributed)
        return loss

    def _step_group(self, group: dict, distributed: bool) -> None:
        params = group["params"]
        if not params:
            return
        dtype = self.ns_dtype or default_ns_dtype(params[0].device)
        mine = [i for i, p in enumerate(params) if i % self.world_size == self.rank and p.grad is not None]
        updates = self._updates([params[i] for i in mine], group, dtype)
        lr, wd = group["lr"], group["weight_decay"]
        if not distributed:
            # One process owns every matrix: apply the updates straight away (the flat buffer of
            # the distributed path would only copy them; the values are the same).
            stepped = [params[i] for i in mine]
            deltas = [u.view_as(p).to(p.dtype) for u, p in zip(updates, stepped)]
        else:
            # One flat buffer for the whole group: the same layout on every rank, so one collective
            # suffices. Ranks write only the slices they own; the sum of zeros elsewhere is exact.
            sizes = [p.numel() for p in params]
            offsets = [0]
            for n in sizes:
                offsets.append(offsets[-1] + n)
            flat = torch.zeros(offsets[-1], dtype=dtype, device=params[0].device)
            for i, u in zip(mine, updates):
                flat[offsets[i]:offsets[i + 1]] = u.reshape(-1)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            # grad None is the same on every rank under DDP, so skipping stays consistent.
            stepped = [p for p in params if p.grad is not None]
            deltas = [flat[offsets[i]:offsets[i + 1]].view_as(p).to(p.dtype)
                      for i, p in enumerate(params) if p.grad is not None]
        if not stepped:
            return
        if wd > 0:
            torch._foreach_mul_(stepped, 1.0 - lr * wd)
        torch._foreach_add_(stepped, deltas, alpha=-lr)

    def _updates(self, params: list, group: dict, dtype: torch.dtype) -> list[torch.Tensor]:
        """The orthogonalised, shape-scaled update of each parameter (momentum advanced)."""
        if not params:
            return []
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Muon does not support sparse gradients")
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        mu = group["momentum"]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        ds = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        out = []
        for d in ds:
            mat = d.reshape(d.size(0), -1)
            u = self._ns(mat, group["ns_steps"], dtype=dtype)
            # Orthogonalised updates have RMS ~ 1/sqrt(max dim); the baseline rescales tall matrices
            # so their per-element step matches a square one.
            rows, cols = mat.shape
            out.append(u * max(1.0, rows / cols) ** 0.5)
        return out
