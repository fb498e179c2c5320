"""Exponential moving average of a model's weights (PR #287 / #401; pg_mechanics.md §4.3).

An fp32 shadow of the full state_dict, initialised from the current weights and updated after
every optimizer step: ema <- d*ema + (1 - d)*w (d = 0.997 in the records). At the end of training
the shadow is copied into the model, cast back to each tensor's dtype, and everything downstream
(quantization, evaluation, TTT) uses it.

    ema = EMA(model, recipe.ema.decay)
    for step ...:
        ...; opt.step(); ema.update(model)
    ema.copy_to(model)

`state_dict()` / `load_state_dict()` carry the shadow through a checkpoint so a resumed run
continues the same average. Pass the same module object (compiled or not) every time: the
shadow is keyed by its state_dict names.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 shadow weights. Floating-point entries are averaged; others (integer buffers,
    counters) are copied from the model at each update so the shadow stays loadable as is."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
                for k, v in model.state_dict().items()
            }
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]

    def _model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            extra = sorted(set(state) - set(self.shadow))[:5]
            absent = sorted(set(self.shadow) - set(state))[:5]
            raise KeyError(f"model state_dict does not match the EMA shadow "
                           f"(new: {extra}, missing: {absent})")
        return state

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step with the model's current weights."""
        state = self._model_state(model)
        if self._float_keys:
            ema = [self.shadow[k] for k in self._float_keys]
            # Cast to fp32 so a bf16 model still averages in full precision (the point of an
            # fp32 shadow: (1 - d) * w is far below bf16 resolution relative to ema).
            cur = [state[k].detach().to(torch.float32) for k in self._float_keys]
            # foreach keeps this to a handful of kernel launches; it runs inside the timed loop.
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, cur, alpha=1.0 - self.decay)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(state[k])
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow into the model in place, cast to each tensor's own dtype."""
        for k, v in self._model_state(model).items():
            v.copy_(self.shadow[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise KeyError("EMA checkpoint keys do not match this model's state_dict")
        for k, v in self.shadow.items():
            if v.shape != shadow[k].shape:
                raise ValueError(f"EMA checkpoint tensor {k} has shape {tuple(shadow[k].shape)}, "
                                 f"expected {tuple(v.shape)}")
            v.copy_(shadow[k])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
