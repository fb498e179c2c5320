"""In-place gradient transforms run between `backward()` and `optimizer.step()`.

Order used by the train stage: nan_to_num_ (if the recipe asks) -> condition_gradients ->
clip_grad_norm. Each takes an iterable of parameters (tensors) and skips those without a grad.

    nan_to_num_(model.parameters())                  # PR #298: NaN -> 0, +-inf -> finite max
    condition_gradients(model.parameters(), recipe.optim.grad_conditioning)
    norm = clip_grad_norm(model.parameters(), recipe.train.grad_clip)   # 0 = off, norm still logged
"""

from __future__ import annotations

from typing import Iterable

import torch

from pipeline.config import GradConditioningConfig


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def condition_gradients(params: Iterable[torch.Tensor], cfg: GradConditioningConfig) -> None:
    """lof310's gradient conditioning g <- s*g + b per tensor (seed_components.md §2.2).

    With the default identity (s = 1, b = 0) the gradients are not touched at all, so recipes
    that leave it off stay bitwise identical to runs without this hook.
    """
    if cfg.scale == 1.0 and cfg.bias == 0.0:
        return
    grads = _grads(params)
    if not grads:
        return
    if cfg.scale != 1.0:
        torch._foreach_mul_(grads, cfg.scale)
    if cfg.bias != 0.0:
        # b is a scalar broadcast to every element: a uniform drift along the all-ones direction.
        torch._foreach_add_(grads, cfg.bias)


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
