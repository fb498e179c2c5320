"""Optimizers and what runs around them: Muon, the Muon/Adam split, schedules, grad transforms.

    from pipeline.optim import (build_optimizers, lr_multiplier, muon_momentum, apply_schedule,
                                nan_to_num_, condition_gradients, clip_grad_norm,
                                check_grad_conditioning, GradConditioningState)

    optimizers = build_optimizers(model, recipe.optim, rank, world_size)
    check_grad_conditioning(recipe.optim.grad_conditioning)   # bad rule regex -> UserError
    grad_state = GradConditioningState()     # hypergradient scalars; save/restore with checkpoints
    for step in range(...):
        loss.backward()
        if recipe.train.nan_to_num_grads:
            nan_to_num_(model.parameters())
        condition_gradients(model.named_parameters(), recipe.optim.grad_conditioning, grad_state)
        grad_norm = clip_grad_norm(model.parameters(), recipe.train.grad_clip)
        apply_schedule(optimizers, lr_multiplier(step, recipe.train, elapsed_s),
                       muon_momentum(step, recipe.optim))
        for opt in optimizers: opt.step()
"""

from pipeline.optim.build import build_optimizers, check_coverage
from pipeline.optim.grad_transforms import (GradConditioningState, check_grad_conditioning, clip_grad_norm,
                                            condition_gradients, conditioning_of, nan_to_num_)
from pipeline.optim.muon import Muon, default_ns_dtype, newton_schulz
from pipeline.optim.schedule import apply_schedule, lr_multiplier, muon_momentum

__all__ = [
    "Muon", "newton_schulz", "default_ns_dtype",
    "build_optimizers", "check_coverage",
    "lr_multiplier", "muon_momentum", "apply_schedule",
    "condition_gradients", "check_grad_conditioning", "conditioning_of", "GradConditioningState",
    "nan_to_num_", "clip_grad_norm",
]
