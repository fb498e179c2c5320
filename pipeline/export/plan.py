"""The quantization plan: the recipe's quant rules resolved per tensor, then each tensor encoded.

Usage:
    roles = param_roles(model)          # pipeline.model.roles, or tensor_roles(recipe.model)
    plan = resolve_plan(named_shapes_of(model), recipe.quant.rules, roles)   # JSON-able list
    qmodel = quantize_state_dict(model.state_dict(), recipe.quant.rules, roles=roles)
    # qmodel.tensors -> container entries, qmodel.manifest -> per-tensor header,
    # qmodel.plan -> the resolved plan; pipeline.export.artifact writes it.

Rule matching (first match wins, in recipe order): `re.search(rule.pattern, name)`, the
tensor's role among `rule.roles` (when the rule names roles), and `min_numel <= numel <=
max_numel`, where a bound of 0 means unbounded. Roles are the ones parts declare where they
create parameters, so the default plan keeps every control and gate tensor fp32 without a list of
names. Non-float tensors ignore the rules and pass through bit-exact ("raw"). A float tensor that
no rule matches is a user error: the plan must say what happens to every tensor, so the recipe
needs a catch-all last rule. `resolve_plan` only needs shapes, dtypes and roles, so it runs on a
meta-device model (`pgolf check`) as well as on trained weights. Scheme names are those of the
codec's registry (pipeline.export.codec.SCHEMES).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from pipeline.config import QuantConfig, QuantRule
from pipeline.errors import UserError
from pipeline.export.codec import (LQER_MODULE, SCHEMES, container_keys, dtype_name, extension, quantize_tensor,
                                   selectable_schemes)


@dataclass
class QuantizedModel:
    """A state_dict after quantization, ready to be written as a container.

    tensors:  container entries (`<name>.q`, `<name>.scale` or `<name>`), in plan order.
    manifest: {name: {"scheme", "dtype", "shape", "clip_percentile"}}, the header the
              reader needs to restore each tensor to its original dtype and shape.
    plan:     the resolved plan (list of dicts, see `resolve_plan`).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, dict] = field(default_factory=dict)
    plan: list[dict] = field(default_factory=list)

    def entries_of(self, name: str) -> list[str]:
        """Container keys holding state_dict tensor `name`."""
        return container_keys(name, self.manifest[name]["scheme"])


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r} in the tensor list given to the quant plan")
    return dt


def _rules_of(rules) -> tuple[QuantRule, ...]:
    if isinstance(rules, QuantConfig):
        return tuple(rules.rules)
    return tuple(rules)


def named_shapes_of(obj) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of a module's state_dict (meta device is fine) or of a mapping
    of tensors."""
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def check_quant_rules(rules: tuple[QuantRule, ...]) -> list[re.Pattern]:
    if not rules:
        raise UserError("quant.rules is empty; add at least one rule, e.g. a final catch-all "
                        "`{scheme: int8, pattern: '.*'}`")
    compiled = []
    for i, r in enumerate(rules):
        if r.scheme not in selectable_schemes():
            raise UserError(f"quant.rules[{i}] has scheme {r.scheme!r}; use one of "
                            f"{', '.join(selectable_schemes())}")
        try:
            compiled.append(re.compile(r.pattern))
        except re.error as e:
            raise UserError(f"quant.rules[{i}] pattern {r.pattern!r} is not a valid regular "
                            f"expression ({e}); fix the pattern") from None
        if r.clip_sigmas is not None and not SCHEMES[r.scheme].takes_clip:
            clipping = "/".join(n for n, s in SCHEMES.items() if s.takes_clip)
            raise UserError(f"quant.rules[{i}] sets clip_sigmas on scheme {r.scheme!r}; clipping only applies "
                            f"to {clipping}, remove it")
        if r.clip_sigmas is not None and r.clip_percentile is not None:
            raise UserError(f"quant.rules[{i}] sets both clip_percentile and clip_sigmas; a row's clip is one or "
                            "the other, remove one")
        if r.clip_percentile is not None:
            if not SCHEMES[r.scheme].takes_clip:
                clipping = "/".join(n for n, s in SCHEMES.items() if s.takes_clip)
                raise UserError(f"quant.rules[{i}] sets clip_percentile on scheme {r.scheme!r};"
                                f" clipping only applies to {clipping}, remove it")
            if not 0.0 < float(r.clip_percentile) <= 100.0:
                raise UserError(f"quant.rules[{i}] clip_percentile {r.clip_percentile} must be "
                                "in (0, 100], e.g. 99.99984")
        if r.min_numel < 0 or r.max_numel < 0:
            raise UserError(f"quant.rules[{i}] has a negative min_numel/max_numel; "
                            "use 0 for unbounded")
    return compiled


def resolve_plan(named_shapes: Mapping[str, tuple], rules, roles: Mapping[str, str] | None = None) -> list[dict]:
    """One dict per tensor, in the given order: {name, scheme, clip_percentile, scale_floor, clip_sigmas,
    numel, rule_index, role}. Non-float tensors get scheme "raw" and rule_index None. `roles` ({name:
    role}, pipeline.model.roles) is needed when a rule names roles; tensors without a role
    (buffers) match only rules that name none."""
    rules = _rules_of(rules)
    compiled = check_quant_rules(rules)
    if roles is None and any(r.roles for r in rules):
        raise ValueError("resolve_plan: a quant rule names parameter roles, so pass roles= "
                         "(pipeline.model.roles.param_roles(model) or tensor_roles(recipe.model))")
    roles = roles or {}
    plan = []
    for name, (shape, dtype) in named_shapes.items():
        numel = math.prod(int(d) for d in shape)
        role = roles.get(name)
        if not as_dtype(dtype).is_floating_point:
            plan.append({"name": name, "scheme": "raw", "clip_percentile": None, "scale_floor": None,
                         "clip_sigmas": None, "numel": numel, "rule_index": None, "role": role})
            continue
        for i, (rule, rx) in enumerate(zip(rules, compiled)):
            if not rx.search(name) or (rule.roles and role not in rule.roles):
                continue
            if (rule.min_numel and numel < rule.min_numel) or \
                    (rule.max_numel and numel > rule.max_numel):
                continue
            plan.append({"name": name, "scheme": rule.scheme,
                         "clip_percentile": rule.clip_percentile, "scale_floor": rule.scale_floor,
                         "clip_sigmas": rule.clip_sigmas, "numel": numel, "rule_index": i, "role": role})
            break
        else:
            raise UserError(
                f"tensor {name!r} (shape {list(shape)}, {numel} elements) matches no rule in "
                "quant.rules; add a catch-all last rule such as `{scheme: int8, pattern: '.*'}`")
    return plan


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], rules,
                        plan: Iterable[dict] | None = None, roles: Mapping[str, str] | None = None,
                        calibration: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> QuantizedModel:
    """Quantize every tensor of `state_dict` by its plan entry (resolved here, with `roles`, if not
    given). `calibration`: {scheme: {tensor name: tensor}}, what each scheme's calibrate hook
    returned (pipeline.export.calibration); a tensor's entry reaches its scheme's encode. When
    `rules` is a whole QuantConfig with `lqer` set, LQER then repairs its top_k tensors
    (pipeline/export/lqer.py; their manifest scheme becomes "<scheme>+lqer<rank>")."""
    if plan is None:
        plan = resolve_plan(named_shapes_of(state_dict), rules, roles)
    calibration = calibration or {}
    plan = list(plan)
    out = QuantizedModel(plan=plan)
    for entry in plan:
        name, scheme = entry["name"], entry["scheme"]
        t = state_dict[name]
        if t.device.type == "meta":
            raise UserError(f"tensor {name!r} is on the meta device (no data); quantize "
                            "trained weights, or use predict_bytes for a dry run")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {name!r} contains NaN or inf; training diverged — "
                            "package the last good checkpoint or lower the learning rate")
        entries = quantize_tensor(t.detach().cpu(), scheme, entry["clip_percentile"], name,
                                  scale_floor=entry.get("scale_floor"),
                                  calibration=calibration.get(scheme, {}).get(name),
                                  clip_sigmas=entry.get("clip_sigmas"))
        clash = [k for k in entries if k in out.tensors]
        if clash:
            raise UserError(f"container name {clash[0]!r} of tensor {name!r} collides with "
                            "another tensor's entry (a tensor named like '<x>.q' or "
                            "'<x>.scale'); rename the parameter")
        out.tensors.update(entries)
        out.manifest[name] = {"scheme": scheme, "dtype": dtype_name(t.dtype),
                              "shape": list(t.shape), "clip_percentile": entry["clip_percentile"]}
        if entry.get("clip_sigmas") is not None:  # only when set: earlier plans' headers stay byte-identical
            out.manifest[name]["clip_sigmas"] = entry["clip_sigmas"]
    lqer = rules.lqer if isinstance(rules, QuantConfig) else None
    if lqer is not None:
        extension(LQER_MODULE).apply_lqer(out, state_dict, lqer.rank, lqer.top_k)
    return out
