"""The Orthogonal-Parallel residual (seed_components.md §2.1): formulas, init, guard, causality."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.audit import audit_model, randomize_zero_params
from pipeline.config import ModelConfig
from pipeline.model.compose import replace_model
from pipeline.model.parts.orthopar import OrthoParConfig, OrthoParResidual
from pipeline.model.roles import param_roles
from pipeline.model.registry import build_model, resolve

D = 16
CFG = ModelConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


def make(fixed: bool, d: int = D, **orthopar) -> OrthoParResidual:
    torch.manual_seed(0)
    return OrthoParResidual(replace_model(CFG, model_dim=d, orthopar=OrthoParConfig(**orthopar)), fixed=fixed)


def naive(x, y, alpha, beta, fixed, eps=1e-8, sum_eps=1e-6):
    """The formulas token by token and channel by channel, in float64 Python loops."""
    x, y, alpha, beta = (t.double() for t in (x, y, alpha, beta))
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xv, yv = x[b, t].tolist(), y[b, t].tolist()
            c = sum(p * q for p, q in zip(xv, yv)) / max(sum(p * p for p in xv), eps)
            s = sum(yv)
            s = s + (sum_eps if s >= 0 else -sum_eps)
            for i in range(len(xv)):
                orth = alpha[i] * (yv[i] - c * xv[i])
                par = beta[i] * (c * xv[i]) if fixed else beta[i] * (c * yv[i] / s)
                out[b, t, i] = xv[i] + orth + par
    return out


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("fixed", [False, True])
def test_matches_naive_per_token_loop(fixed):
    res = make(fixed)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)
    y = y + 0.5  # keeps sum(y) well away from 0, so fp32 vs float64 is a fair 1e-6 comparison
    with torch.no_grad():
        out = res(x, y)
    ref = naive(x, y, res.ortho_alpha.detach(), res.ortho_beta.detach(), fixed)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel(out, ref) < 1e-6


def test_fixed_is_gain_plus_rescaled_x():
    res = make(fixed=True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, D, generator=g), torch.randn(3, 4, D, generator=g)
    a, b = res.ortho_alpha.detach().double(), res.ortho_beta.detach().double()
    xd, yd = x.double(), y.double()
    c = (xd * yd).sum(-1, keepdim=True) / (xd * xd).sum(-1, keepdim=True)
    with torch.no_grad():
        out = res(x, y)
    assert rel(out, xd + a * yd + (b - a) * (c * xd)) < 1e-6
    # ...and it is not the faithful variant (same alpha, beta)
    faithful = make(fixed=False)
    with torch.no_grad():
        assert rel(faithful(x, y), out) > 1e-2


@pytest.mark.parametrize("stats", [(0.25, 0.5, 0.15, 0.25), (-0.3, 0.1, 0.7, 0.05)])
def test_init_statistics_follow_config(stats):
    am, asd, bm, bsd = stats
    res = make(False, d=4096, alpha_mean=am, alpha_std=asd, beta_mean=bm, beta_std=bsd)
    for p, mean, std in ((res.ortho_alpha, am, asd), (res.ortho_beta, bm, bsd)):
        # 4 standard errors: mean se = std / 64, std se ~= std / sqrt(2 * 4096) ~= std / 90.5
        assert abs(p.mean().item() - mean) < 4 * std / 64
        assert abs(p.std().item() - std) < 4 * std / 90.5
    assert not torch.equal(res.ortho_alpha, res.ortho_beta)


def test_every_site_draws_its_own_parameters_and_they_are_control():
    model = build_model(replace(CFG, residual="orthopar"))
    alphas = {n: p for n, p in model.named_parameters() if n.endswith("ortho_alpha")}
    assert sorted(alphas) == [f"blocks.{i}.{s}_residual.ortho_alpha" for i in (0, 1) for s in ("attn", "mlp")]
    vals = list(alphas.values())
    assert all(not torch.equal(vals[0], v) for v in vals[1:])
    names = [n for n, _ in model.named_parameters() if "ortho_" in n]
    roles = param_roles(model)
    assert len(names) == 8 and all(roles[n] == "control" for n in names)
    assert all(model.route_param(n, p) == "scalar" for n, p in model.named_parameters() if "ortho_" in n)
    # parameter count by formula: the standard trunk plus alpha and beta (D each) per layer and site
    assert model.num_params() == build_model(CFG).num_params() + 2 * 2 * 2 * CFG.model_dim


def test_meta_build_skips_the_draw():
    with torch.device("meta"):
        model = build_model(replace(CFG, residual="orthopar_fixed"))
    assert model.blocks[0].attn_residual.ortho_alpha.is_meta


def test_zero_sum_is_guarded_with_plus_sign():
    res = make(fixed=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, D, generator=g)
    half = torch.randn(1, 2, D // 2, generator=g)
    y = torch.cat((half, -half), -1)  # sum(y) == 0 exactly in fp32 (pairs cancel)
    assert (y.sum(-1) == 0).all()
    with torch.no_grad():
        out = res(x, y)
    assert torch.isfinite(out).all()
    # s = 0 is replaced by +sum_eps (sign(0) counts as +), and the negative side by -sum_eps
    assert rel(out, naive(x, y, res.ortho_alpha.detach(), res.ortho_beta.detach(), False)) < 1e-6
    y_neg = y.clone()
    y_neg[..., 0] -= 1e-7  # a tiny negative sum: guarded to s - sum_eps, not toward 0
    with torch.no_grad():
        out_neg = res(x, y_neg)
    assert torch.isfinite(out_neg).all()
    assert rel(out_neg, naive(x, y_neg, res.ortho_alpha.detach(), res.ortho_beta.detach(), False)) < 1e-5


def test_low_precision_inputs_keep_the_standard_result_dtype():
    res = make(fixed=False)
    x = torch.randn(2, 3, D)
    y = torch.randn(2, 3, D) + 0.5
    assert res(x, y.bfloat16()).dtype == torch.float32  # fp32 stream + bf16 sublayer, as x + y
    out = res(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = res(x.bfloat16().float(), y.bfloat16().float())
    assert rel(out, ref) < 1e-2  # only the final cast differs: the reductions ran in fp32


def test_gradients_reach_alpha_and_beta():
    res = make(fixed=False)
    x, y = torch.randn(2, 3, D), torch.randn(2, 3, D) + 0.5
    res(x, y).square().sum().backward()
    assert res.ortho_alpha.grad.abs().min() > 0 and res.ortho_beta.grad.abs().min() > 0


@pytest.mark.parametrize("residual", ["orthopar", "orthopar_fixed"])
def test_causality_battery_passes(residual, one_thread):
    torch.manual_seed(0)
    model = build_model(replace(CFG, residual=residual)).eval()
    randomize_zero_params(model)
    results = audit_model(model, CFG.vocab_size, seq_len=32)
    assert all(r.passed and r.max_dev <= 1e-6 for r in results), [r.line() for r in results]


class SequenceSumOrthoPar(OrthoParResidual):
    """A known bad variant: s summed over the whole window (tokens and channels), not per token."""

    def forward(self, x, y):
        s = y.float().sum(dim=(-2, -1), keepdim=True) + self.sum_eps
        c = (x * y).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True).clamp_min(self.eps)
        return x + self.ortho_alpha * (y - c * x) + self.ortho_beta * (c * y / s)


def test_a_sequence_wide_sum_fails_the_battery(one_thread):
    torch.manual_seed(0)
    cfg = replace(CFG, residual="orthopar")
    model = build_model(cfg).eval()
    leaky = SequenceSumOrthoPar(cfg, fixed=False)
    leaky.load_state_dict(model.blocks[1].mlp_residual.state_dict())
    model.blocks[1].mlp_residual = leaky
    randomize_zero_params(model)
    results = {r.test: r for r in audit_model(model, cfg.vocab_size, seq_len=32)}
    assert not results["future_perturbation@1"].passed
    assert not results["prefix_consistency"].passed
    assert results["future_perturbation@1"].culprit.startswith("blocks.1.mlp_residual")


def test_unknown_residual_name_suggests_the_close_one():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="Did you mean 'orthopar'"):
        resolve("residual", "orthopr")
