"""Parameter roles: what a parameter is, declared where it is created, read by everything after.

    self.q_gain = nn.Parameter(torch.full((H,), 1.5))
    set_roles(self, control=("q_gain",))          # in the part's __init__, next to the Parameter
    roles = param_roles(model)                     # {state_dict name: role}, every parameter

Roles and what reads them:

| role        | optimizer (pipeline.optim.build)  | default quant plan (QuantConfig) | report group |
|-------------|-----------------------------------|----------------------------------|--------------|
| `matrix`    | Muon at matrix_lr (must be 2-D)   | size and name rules              | attn/mlp/other by name |
| `embedding` | Adam at embed_lr                  | size and name rules              | embed        |
| `head`      | Adam at head_lr (untied head)     | size and name rules              | embed        |
| `control`   | Adam at scalar_lr                 | kept fp32                        | control      |
| `gate`      | Adam at scalar_lr                 | kept fp32                        | control      |
| `other`     | Adam at scalar_lr                 | size and name rules              | attn/mlp/other by name |

`control` is a gain, scale, mix or other small tensor that multiplies the stream; `gate` is a
control tensor that feeds a sigmoid/softmax gate (treated as control by default, but a quant rule
can single gates out, as PR #1736's int8 gate quantization did, pg_mechanics.md §4.1.2); `other`
is every remaining tensor trained by Adam (biases, norm affines, convolution kernels).

Standard layers need no declaration: `nn.Linear` weight -> matrix, bias -> other; `nn.Embedding`
-> embedding; norm and convolution layers -> other. A Parameter registered directly on any other
module must be declared with `set_roles`, or `param_roles` refuses the model and names it: a gain
created without a role can neither slip into Muon nor into an int6 rule unnoticed.

The declaration lives on the owning module (`_pgolf_roles`, local name -> role), so it survives
`copy.deepcopy`, `.to()`, DistributedDataParallel and torch.compile wrappers (their names gain a
prefix, and `param_roles` walks the same names as `named_parameters`) and never depends on the
state_dict name a parameter ends up under. Runtime-pure (torch only): the submission bundles it.
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = ("matrix", "embedding", "head", "control", "gate", "other")
# Roles that get the control treatment: fp32 in the default plan, the "control" report group,
# constant-ish stand-ins in the size predictor.
CONTROL_ROLES = ("control", "gate")
# The optimizer route of each role (the groups of pipeline.optim.build).
ROUTE = {"matrix": "matrix", "embedding": "embed", "head": "head", "control": "scalar", "gate": "scalar",
         "other": "scalar"}

_ATTR = "_pgolf_roles"


def set_roles(module: nn.Module, **names_by_role: tuple[str, ...]) -> nn.Module:
    """Declare the role of `module`'s own parameters, e.g. `set_roles(self, control=("q_gain",))`.

    Names may be dotted (`set_roles(self, head=("lm_head.weight",))`) to override a child's default.
    A name whose attribute is None (an option switched off) is skipped. Returns `module`."""
    for role, names in names_by_role.items():
        if role not in ROLES:
            raise ValueError(f"unknown parameter role {role!r}; roles are {', '.join(ROLES)}")
        if isinstance(names, str):  # set_roles(self, control="q_gain") would otherwise tag q, _, g, ...
            raise TypeError(f"set_roles({role}=...) takes a tuple of parameter names, got the string {names!r}")
        for name in names:
            owner, _, local = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            if local not in mod._parameters:
                if hasattr(mod, local) and getattr(mod, local) is None:
                    continue  # an optional parameter the config left out
                raise ValueError(f"{type(mod).__name__} has no parameter {local!r} (a typo, or set_roles before "
                                 "the Parameter is assigned)")
            mod.__dict__.setdefault(_ATTR, {})[local] = role
    return module


def _default_role(module: nn.Module, local: str) -> str | None:
    if isinstance(module, nn.Embedding) and local == "weight":
        return "embedding"
    if isinstance(module, nn.Linear):
        return "matrix" if local == "weight" else "other"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.conv._ConvNd)):
        return "other"
    return None


def param_roles(model: nn.Module) -> dict[str, str]:
    """{name: role} for every parameter of `model`, in `named_parameters` order.

    Raises ValueError for a parameter without a role (neither declared nor a standard layer's)
    and for a `matrix` that is not 2-D (Muon orthogonalises 2-D matrices only)."""
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        declared = mod.__dict__.get(_ATTR, {})
        for local, p in mod._parameters.items():
            if p is None:
                continue
            name = f"{mod_name}.{local}" if mod_name else local
            role = declared.get(local) or _default_role(mod, local)
            if role is None:
                raise ValueError(
                    f"parameter {name!r} (shape {list(p.shape)}) of {type(mod).__name__} has no role: declare it "
                    f"where it is created, e.g. set_roles(self, control=({local!r},)); roles: {', '.join(ROLES)} "
                    "(pipeline/model/roles.py)")
            if role == "matrix" and p.ndim != 2:
                raise ValueError(f"parameter {name!r} has role matrix but shape {list(p.shape)}: Muon needs 2-D "
                                 "matrices; declare it control, gate or other")
            out[name] = role
    # named_modules(remove_duplicate=False) visits a shared module under each of its names, as
    # named_parameters does not; keep exactly the names named_parameters yields, in its order.
    return {name: out[name] for name, _ in model.named_parameters()}


def route_groups(model: nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Parameters by optimizer route ("embed", "head", "matrix", "scalar"), in parameter order."""
    roles = param_roles(model)
    groups: dict[str, list] = {"embed": [], "head": [], "matrix": [], "scalar": []}
    for name, p in model.named_parameters():
        groups[ROUTE[roles[name]]].append((name, p))
    return groups


def tensor_roles(model_cfg) -> dict[str, str]:
    """{name: role} of the model a ModelConfig describes, built on the meta device (no weights):
    what the export stage needs beside a state_dict read from disk."""
    from pipeline.model.registry import build_model

    with torch.device("meta"):
        return param_roles(build_model(model_cfg))


def report_group(name: str, role: str | None) -> str:
    """The artifact report group of state_dict tensor `name`: control and embedding roles by role,
    the rest by where the tensor sits (`.attn.`, `.mlp.`), else "other". A tensor without a role
    (a buffer) goes by its name."""
    if role in CONTROL_ROLES:
        return "control"
    if role in ("embedding", "head"):
        return "embed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "other"
