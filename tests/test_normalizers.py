"""Mixing-weight normalizers (softmax and OUR ShiftMax reconstructions, seed_components.md §2.3)
and their use on unet_gpt's resid_mix via `model.mix_normalizer`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.audit import audit_model, randomize_zero_params
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.model import gpt
from pipeline.model.base import rms_norm
from pipeline.model.compose import replace_model
from pipeline.model.parts.normalizers import EPS, TAU
from pipeline.model.registry import build_model, names, resolve
from pipeline.recipe import load_recipe

NAMES = ["shiftmax_recon_min", "shiftmax_recon_relu", "shiftmax_recon_sq", "softmax"]
CFG = ModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


def norm(name):
    return resolve("normalizer", name)(CFG)


def z_batch(seed=0):
    return torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_registered_names():
    assert names("normalizer") == NAMES


def explicit(name, z, dim):
    """The formulas written out with torch.min / max (float64)."""
    lo, hi = z.min(dim, keepdim=True).values, z.max(dim, keepdim=True).values
    w = {"softmax": (z - hi).exp(), "shiftmax_recon_min": z - lo + EPS,
         "shiftmax_recon_relu": (z - hi + TAU).clamp_min(0), "shiftmax_recon_sq": (z - lo) ** 2 + EPS}[name]
    return w / w.sum(dim, keepdim=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weights_are_a_distribution_and_match_the_formula(name, dim):
    z = z_batch()
    p = norm(name)(z, dim)
    assert p.shape == z.shape and (p >= 0).all()
    assert torch.allclose(p.sum(dim), torch.ones((), dtype=p.dtype), atol=1e-12, rtol=0)
    assert torch.allclose(p, explicit(name, z, dim), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_shift_invariance(name):
    z = z_batch(1)
    assert torch.allclose(norm(name)(z + 3.7, -1), norm(name)(z, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["shiftmax_recon_min", "shiftmax_recon_sq"])
def test_scale_invariance_up_to_eps(name):
    z = z_batch(2)
    p, p_scaled = norm(name)(z, -1), norm(name)(5.0 * z, -1)
    # only EPS breaks it: the difference is of order EPS / (typical gap), far below 1e-4
    assert (p - p_scaled).abs().max() < 1e-4
    assert (p - p_scaled).abs().max() > 0  # ...and EPS does break it


@pytest.mark.parametrize("name", ["softmax", "shiftmax_recon_relu"])
def test_not_scale_invariant(name):
    z = z_batch(2)
    assert (norm(name)(z, -1) - norm(name)(5.0 * z, -1)).abs().max() > 0.05


def test_recon_min_gives_the_argmin_eps_mass():
    z = z_batch(3)
    p = norm("shiftmax_recon_min")(z, -1)
    p_min = p.gather(-1, z.argmin(-1, keepdim=True)).squeeze(-1)
    total = (z - z.amin(-1, keepdim=True) + EPS).sum(-1)
    assert torch.allclose(p_min, EPS / total, rtol=1e-9, atol=0)
    assert p_min.max() < 10 * EPS


def test_recon_relu_support_and_max_mass():
    z = torch.tensor([[0.0, 1.5, 3.0, -10.0]], dtype=torch.float64)
    p = norm("shiftmax_recon_relu")(z, -1)
    # weights relu(z - 3 + TAU) = (0, 0.5, 2, 0) for TAU = 2: 0 beyond TAU below the max
    assert TAU == 2.0
    assert torch.equal(p, torch.tensor([[0.0, 0.2, 0.8, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_all_equal_inputs_give_uniform_weights(name):
    p = norm(name)(torch.full((2, 4), 0.3), -1)
    assert torch.isfinite(p).all() and torch.allclose(p, torch.full((2, 4), 0.25))


@pytest.mark.parametrize("name", NAMES)
def test_resid_mix_init_has_live_gradients(name):
    """At the kept raw init (1, 0) every normalizer passes gradient to both entries (for recon_relu
    only because TAU > 1: with TAU = 1 the init sits on the kink and the mix can never move)."""
    z = torch.tensor([[1.0], [0.0]], requires_grad=True)
    norm(name)(z, 0)[1].sum().backward()
    assert (z.grad != 0).all()


# ----------------------------------------------------------------------------- in the trunk


def seeded(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def ids():
    return torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def raw_mix_forward(block, x, x0):
    """Block.forward as it was before mix_normalizer existed (the raw resid_mix)."""
    mix = block.resid_mix.to(x.dtype)
    x = mix[0] * x + mix[1] * x0
    y = block.attn(rms_norm(x) * block.norm_scale)
    x = block.attn_residual(x, block.attn_scale.to(y.dtype) * y)
    y = block.mlp(rms_norm(x) * block.norm_scale)
    return block.mlp_residual(x, block.mlp_scale.to(y.dtype) * y)


def test_none_is_bitwise_the_raw_mix(monkeypatch):
    cfg = CFG
    assert cfg.mix_normalizer == "none"
    model = seeded(cfg)
    randomize_zero_params(model)  # a trained-like mix, not just (1, 0)
    with torch.no_grad():
        out = model(ids())
        monkeypatch.setattr(gpt.Block, "forward", raw_mix_forward)
        ref = model(ids())
    assert torch.equal(out, ref)
    # same parameters, names and draws as the explicit "none"
    other = seeded(replace(cfg, mix_normalizer="none"))
    assert [n for n, _ in other.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(b.mix_normalizer is None for b in model.blocks)


@pytest.mark.parametrize("name", NAMES)
def test_normalised_model_equals_raw_model_fed_the_normalised_mix(name):
    model = seeded(replace(CFG, mix_normalizer=name))
    randomize_zero_params(model)
    raw = seeded(CFG)
    raw.load_state_dict(model.state_dict())  # same parameter names: nothing was added
    f = norm(name)
    with torch.no_grad():
        for b in raw.blocks:
            b.resid_mix.copy_(f(b.resid_mix, 0))
        assert torch.allclose(model(ids()), raw(ids()), atol=0, rtol=0)
    assert model.num_params() == raw.num_params()


def test_baseline_and_sidecar48_parameter_counts_unchanged():
    for recipe, count in (("baseline", 17_059_912), ("sidecar48", 26_823_765)):
        with torch.device("meta"):
            assert build_model(load_recipe(recipe).model).num_params() == count


@pytest.mark.parametrize("name", NAMES)
def test_causality_battery_passes(name, one_thread):
    model = seeded(replace(CFG, mix_normalizer=name))
    randomize_zero_params(model)
    results = audit_model(model, CFG.vocab_size, seq_len=32)
    assert all(r.passed and r.max_dev <= 1e-6 for r in results), [r.line() for r in results]


def test_unknown_name_fails_at_build_with_did_you_mean():
    with pytest.raises(UserError, match="Did you mean 'shiftmax_recon_min'"):
        build_model(replace(CFG, mix_normalizer="shiftmax_recon_mn"))
    with pytest.raises(UserError, match=r"model\.mix_normalizer: .*Did you mean 'softmax'"):  # and at load
        load_recipe("tiny", ["model.mix_normalizer=softmx"])


def test_normalizer_without_resid_mix_fails_loudly():
    with pytest.raises(UserError, match="resid_mix"):
        build_model(replace_model(CFG, mix_normalizer="softmax", resid_mix=False))


def test_depth_recurrent_refuses_a_mix_normalizer():
    # depth_recurrent resolves no normalizer part: refused when the recipe loads, before any build
    with pytest.raises(UserError, match="model.mix_normalizer: trunk 'depth_recurrent' takes no normalizer part"):
        load_recipe("depth_recurrent", ["model.mix_normalizer=softmax"])
