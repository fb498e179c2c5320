"""Build the optimizer split of a model: Muon for block matrices, Adam(W) for everything else.

    optimizers = build_optimizers(model, recipe.optim, rank, world_size)
    ...
    for opt in optimizers: opt.step()

Routing comes from `model.param_groups()` (pipeline.model.base), which reads the role each part
declared for its parameters where it created them (pipeline.model.roles: matrix -> "matrix",
embedding -> "embed", head -> "head", control / gate / other -> "scalar"; no name patterns):
"matrix" -> Muon at matrix_lr; "embed", "head" and "scalar" -> one Adam each at embed_lr / head_lr /
scalar_lr with the recipe's betas and eps (pg_mechanics.md §3.3). adam_wd > 0 switches those to
AdamW, whose decoupled decay p <- p*(1 - lr*wd) follows the LR schedule like Muon's (PR #684 uses
0.04, seed_prs.md §3.0); embed_wd, when set, replaces it for the embedding group (the records' 0.085
beside 0.02 for scalars). Muon's Newton–Schulz variant (Polar Express, MuonEq-R row normalisation)
comes from optim.muon_ns_coeffs / muon_row_normalize (pipeline/optim/muon_variants.py).
Each param group records its unscheduled lr in `base_lr` (the schedule multiplies it) and its
route in `route`. Frozen parameters (requires_grad False) are left out; every trainable
parameter must land in exactly one optimizer, which is checked here.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.optim.muon import Muon
from pipeline.optim.muon_variants import orthogonaliser
from pipeline.optim.schedule import muon_momentum

ROUTES = ("embed", "head", "matrix", "scalar")


def build_optimizers(
    model: nn.Module, cfg: OptimConfig, rank: int = 0, world_size: int = 1
) -> list[torch.optim.Optimizer]:
    """One optimizer per non-empty route, in the order matrix, embed, head, scalar."""
    routed = model.param_groups()
    unknown = sorted(set(routed) - set(ROUTES))
    if unknown:
        raise ValueError(f"param_groups() returned unknown routes {unknown}; expected {list(ROUTES)}")

    def trainable(route: str) -> list[torch.Tensor]:
        return [p for _, p in routed.get(route, []) if p.requires_grad]

    optimizers: list[torch.optim.Optimizer] = []
    matrices = trainable("matrix")
    if matrices:
        optimizers.append(Muon(
            [{"params": matrices, "base_lr": cfg.matrix_lr, "route": "matrix"}],
            lr=cfg.matrix_lr,
            # Start at the warm-up's step-0 value so a loop that forgets apply_schedule on its
            # first step still matches the intended trajectory.
            momentum=muon_momentum(0, cfg),
            nesterov=True,
            ns_steps=cfg.muon_ns_steps,
            weight_decay=cfg.muon_wd,
            rank=rank,
            world_size=world_size,
            orthogonalise=orthogonaliser(cfg.muon_ns_coeffs, cfg.muon_row_normalize),
        ))

    # torch.optim.Adam's weight_decay is L2 added to the gradient (coupled), not what the records
    # use, so decay always goes through AdamW; weight_decay is passed explicitly in both cases
    # because AdamW's own default is 0.01, not 0.
    for route, lr in (("embed", cfg.embed_lr), ("head", cfg.head_lr), ("scalar", cfg.scalar_lr)):
        params = trainable(route)
        if not params:
            continue
        wd = cfg.embed_wd if route == "embed" and cfg.embed_wd is not None else cfg.adam_wd
        adam_cls = torch.optim.AdamW if wd > 0 else torch.optim.Adam
        # The fused kernel is the records' choice on GPU; elsewhere let torch pick its default.
        fused = True if all(p.is_cuda for p in params) else None
        optimizers.append(adam_cls(
            [{"params": params, "base_lr": lr, "route": route}],
            lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=wd, fused=fused,
        ))

    check_coverage(model, optimizers)
    return optimizers


def check_coverage(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Raise ValueError unless each trainable parameter of `model` is in exactly one optimizer
    and the optimizers hold nothing else. A parameter left out would silently never train; one
    in two optimizers would be stepped twice."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen[id(p)] = seen.get(id(p), 0) + 1
    twice = sorted(names.get(i, "?") for i, c in seen.items() if c > 1)
    foreign = [i for i in seen if i not in names]
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen)
    problems = []
    if twice:
        problems.append(f"in more than one optimizer: {twice}")
    if missing:
        problems.append(f"in no optimizer: {missing}")
    if foreign:
        problems.append(f"{len(foreign)} tensor(s) that are not parameters of the model")
    if problems:
        raise ValueError("optimizer coverage is wrong; parameters " + "; ".join(problems))
