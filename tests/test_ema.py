"""Tests for pipeline.stages.ema: closed-form convergence, dtype handling, resume equality."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.stages.ema import EMA


class _Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(dtype)
        self.register_buffer("count", torch.tensor(0))


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_constant_weights_follow_closed_form():
    torch.manual_seed(0)
    model = _Net()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    d, k = 0.9, 7
    ema = EMA(model, d)
    _fill(model, 2.0)
    for _ in range(k):
        ema.update(model)
    for name in ("lin.weight", "lin.bias"):
        expected = d ** k * w0[name] + (1 - d ** k) * 2.0
        torch.testing.assert_close(ema.shadow[name], expected, rtol=0, atol=1e-6)
    assert ema.num_updates == k


def test_shadow_is_fp32_and_copy_to_casts_back():
    model = _Net(torch.bfloat16)
    ema = EMA(model, 0.5)
    assert ema.shadow["lin.weight"].dtype == torch.float32
    _fill(model, 1.0)
    model.count.fill_(7)
    ema.update(model)
    assert ema.shadow["count"].item() == 7  # non-float buffers are copied, not averaged
    _fill(model, 0.0)
    model.count.fill_(0)
    ema.copy_to(model)
    assert model.lin.weight.dtype == torch.bfloat16 and model.count.item() == 7
    assert torch.equal(model.lin.weight, ema.shadow["lin.weight"].to(torch.bfloat16))


def test_fp32_shadow_keeps_updates_bf16_would_lose():
    model = _Net(torch.bfloat16)
    _fill(model, 1.0)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.lin.weight.fill_(1.0078125)  # the next bf16 value above 1
    for _ in range(10):
        ema.update(model)
    # Each step moves the average by ~8e-6, far below bf16 resolution at 1.0 (7.8e-3).
    assert (ema.shadow["lin.weight"] - 1.0).abs().min() > 5e-5


def test_resume_continues_identically():
    torch.manual_seed(1)
    model = _Net()
    a = EMA(model, 0.8)
    for v in (0.5, 1.5, -1.0):
        _fill(model, v)
        a.update(model)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = EMA(_Net(), 0.3)
    b.load_state_dict(torch.load(buf))
    assert b.decay == 0.8 and b.num_updates == 3
    for v in (2.0, 0.25):
        _fill(model, v)
        a.update(model)
        b.update(model)
    for k in a.shadow:
        assert torch.equal(a.shadow[k], b.shadow[k])


def test_state_dict_is_a_snapshot_and_mismatch_is_rejected():
    model = _Net()
    ema = EMA(model, 0.5)
    sd = ema.state_dict()
    before = sd["shadow"]["lin.bias"].clone()
    _fill(model, 3.0)
    ema.update(model)
    assert torch.equal(sd["shadow"]["lin.bias"], before)
    with pytest.raises(KeyError):
        ema.update(nn.Linear(4, 3))
    with pytest.raises(ValueError):
        EMA(model, 1.0)
