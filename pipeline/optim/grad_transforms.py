"""In-place gradient transforms run between `backward()` and `optimizer.step()`.

Order used by the train stage: nan_to_num_ (if the recipe asks) -> condition_gradients ->
clip_grad_norm. They skip parameters without a grad. Conditioning takes *named* parameters,
because its per-tensor rules match parameter names:

    check_grad_conditioning(recipe.optim.grad_conditioning)   # once: bad regex -> UserError
    state = GradConditioningState()                           # checkpointed with the optimizers
    nan_to_num_(model.parameters())                  # PR #298: NaN -> 0, +-inf -> finite max
    condition_gradients(model.named_parameters(), recipe.optim.grad_conditioning, state)
    norm = clip_grad_norm(model.parameters(), recipe.train.grad_clip)   # 0 = off, norm still logged
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Optional

import torch

from pipeline.config import GradConditioningConfig
from pipeline.errors import UserError

_WHERE = "optim.grad_conditioning"


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


# ----------------------------------------------------------------------------- conditioning


@functools.lru_cache(maxsize=64)
def check_grad_conditioning(cfg: GradConditioningConfig) -> tuple[re.Pattern, ...]:
    """Compile the rules' patterns; a bad one is a UserError naming it and its config path.

    Same approach as quant.rules (pipeline/export/plan.py `check_quant_rules`). The trainer calls
    it at construction, so a bad recipe fails before any training step."""
    compiled = []
    for i, rule in enumerate(cfg.rules):
        try:
            compiled.append(re.compile(rule.pattern))
        except re.error as e:
            raise UserError(f"{_WHERE}.rules[{i}].pattern {rule.pattern!r} is not a valid regular "
                            f"expression ({e}); fix the pattern") from None
    return tuple(compiled)


@functools.lru_cache(maxsize=4096)
def conditioning_of(name: str, cfg: GradConditioningConfig) -> tuple[float, float]:
    """(s, b) of the parameter `name`: its first matching rule's, else the global ones."""
    for rule, pattern in zip(cfg.rules, check_grad_conditioning(cfg)):
        if pattern.search(name):
            return float(rule.scale), float(rule.bias)
    return float(cfg.scale), float(cfg.bias)


def is_identity(cfg: GradConditioningConfig) -> bool:
    """True when conditioning cannot change any gradient (then it is skipped entirely)."""
    return cfg.mode == "fixed" and (cfg.scale, cfg.bias) == (1.0, 0.0) and all(
        (r.scale, r.bias) == (1.0, 0.0) for r in cfg.rules)


class GradConditioningState:
    """mode=hypergradient's per-tensor s_p, b_p (fp32 0-d tensors) and previous raw gradient,
    keyed by parameter name. Empty in mode=fixed. The trainer saves `state_dict()` in its
    checkpoint and restores it on resume, so a resumed run follows the same trajectory."""

    def __init__(self):
        self.scale: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        self.prev: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {k: {n: t.clone() for n, t in getattr(self, k).items()} for k in ("scale", "bias", "prev")}

    def load_state_dict(self, state: dict) -> None:
        for k in ("scale", "bias", "prev"):
            setattr(self, k, {n: t.clone() for n, t in state[k].items()})


def condition_gradients(named_params: Iterable[tuple[str, torch.Tensor]], cfg: GradConditioningConfig,
                        state: Optional[GradConditioningState] = None) -> None:
    """lof310's gradient conditioning g_p <- s_p*g_p + b_p per tensor p (seed_components.md §2.2).

    b_p is a scalar broadcast to every element: a uniform drift along the all-ones direction.
    With the default identity the gradients (and `state`) are not touched at all, so recipes
    that leave it off stay bitwise identical to runs without this hook. mode=hypergradient needs
    a `state` that persists across steps.
    """
    if is_identity(cfg):
        return
    named = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if cfg.mode == "hypergradient":
        if state is None:
            raise ValueError("grad_conditioning mode=hypergradient learns s and b across steps; "
                             "pass a GradConditioningState")
        _hypergradient_step(named, cfg, state)
        return
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, g in named:
        groups.setdefault(conditioning_of(name, cfg), []).append(g)
    for (s, b), grads in groups.items():
        # s = 1 and b = 0 leave the tensor untouched (a rule may exclude tensors this way).
        if s != 1.0:
            torch._foreach_mul_(grads, s)
        if b != 0.0:
            torch._foreach_add_(grads, b)


@torch.no_grad()
def _hypergradient_step(named: list[tuple[str, torch.Tensor]], cfg: GradConditioningConfig,
                        state: GradConditioningState) -> None:
    """Learn s_p, b_p online, then apply them (our reading of lof310 v1, seed_components.md §2.2).

    Hypergradient descent (Baydin et al. 2018) for plain SGD, w_t = w_{t-1} - lr (s g_{t-1} + b):
    dL_t/ds = -lr <g_t, g_{t-1}> and dL_t/db = -lr sum_i g_t,i, so
        s <- s + hyper_lr_scale * <g_t, g_{t-1}>,   b <- b + hyper_lr_bias * sum_i g_t,i
    with g the RAW gradients (after nan_to_num, before conditioning and clipping) and the lr
    factor folded into the hyper_lr_* constants (the LR schedule does not reach them). There is
    no update at a tensor's first step: w_0 does not depend on s or b yet.

    Under Adam s cancels (up to eps) and under Muon Newton-Schulz normalises it away, so only
    its change over time (how past gradients are weighted in the moments) survives: expect
    about zero effect from s on our Muon+Adam stack (§2.2 analysis). b is not scale-free.
    Under DDP every rank sees the same averaged gradients, so every rank computes the same
    state; rank 0's checkpoint copy is the one restored on all ranks.
    """
    for name, g in named:
        s, b = state.scale.get(name), state.bias.get(name)
        if s is None:
            s0, b0 = conditioning_of(name, cfg)
            s = state.scale[name] = torch.tensor(s0, dtype=torch.float32, device=g.device)
            b = state.bias[name] = torch.tensor(b0, dtype=torch.float32, device=g.device)
        prev = state.prev.get(name)
        if prev is not None:
            if cfg.hyper_lr_scale:
                s.add_(torch.dot(g.reshape(-1).float(), prev.reshape(-1).float()), alpha=cfg.hyper_lr_scale)
            if cfg.hyper_lr_bias:
                b.add_(g.sum(dtype=torch.float32), alpha=cfg.hyper_lr_bias)
        state.prev[name] = g.detach().clone()
        g.mul_(s).add_(b)


# ----------------------------------------------------------------------------- the others


def nan_to_num_(params: Iterable[torch.Tensor]) -> None:
    """Replace NaN gradients by 0 and +-inf by the dtype's largest finite value, in place.

    PR #298 passes every gradient through torch's nan_to_num with its defaults; this keeps one
    bad micro-batch from poisoning optimizer state (it hides the fault rather than fixing it).
    """
    for g in _grads(params):
        torch.nan_to_num_(g)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of all gradients; if max_norm > 0, scale them so it is at most max_norm.

    Returns the norm before clipping (as a float, for logging) in both cases. Under DDP the
    gradients are already averaged, so every rank computes the same global norm.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if max_norm > 0:
        # torch scales by min(1, max_norm / (total + 1e-6)): only ever down, never by 1/0.
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return float(total)
