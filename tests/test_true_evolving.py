"""TrueEvolvingAttention V2 (pipeline/model/parts/true_evolving.py, seed_components.md §1.1).

The card's recurrence is written out below as a plain loop over t (`reference_evolve`): it is
the test-only reference for the parallel conv form, and is never used by the model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import pipeline.model.parts.true_evolving as te
from pipeline.audit import audit_model, randomize_zero_params
from pipeline.config import ModelConfig, QuantConfig
from pipeline.model.compose import model_config, replace_model
from pipeline.model.parts.true_evolving import TrueEvolvingConfig
from pipeline.model.roles import param_roles
from pipeline.model.registry import build_model
from pipeline.recipe import load_recipe
from pipeline.export.plan import named_shapes_of, resolve_plan

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMA = 0.85
CFG = model_config(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=4,
                  attention="true_evolving")


def cfg_with(**te_fields) -> ModelConfig:
    return replace_model(CFG, true_evolving=replace(TrueEvolvingConfig(), **te_fields))


def reference_evolve(q, k, tau, decay):
    """The card's loop, step by step: q~_t = q_t + tau_t + g m, k~_t = k_t + tau_t + 0.5 g m, m = q~_t."""
    qt, kt = torch.empty_like(q), torch.empty_like(k)
    mem = torch.zeros_like(q[:, 0])
    for t in range(q.size(1)):
        qt[:, t] = q[:, t] + tau[t] + decay * mem
        kt[:, t] = k[:, t] + tau[t] + 0.5 * decay * mem
        mem = qt[:, t]
    return qt, kt


def reference_attention(mod: te.TrueEvolvingAttention, x: torch.Tensor) -> torch.Tensor:
    """The whole module written out: loop recurrence, explicit masked softmax, merge, W_o."""
    B, T, D = x.shape
    H, hd = mod.H, mod.hd
    q, k, v = (lin(x).view(B, T, H, hd) for lin in (mod.c_q, mod.c_k, mod.c_v))
    w = mod.evolution_weights.reshape(-1, hd)
    t = torch.arange(T, dtype=x.dtype)[:, None, None]
    tau = torch.sin(mod.rate * (t + 1) * (mod.layer_idx + 1) * w)
    q, k = reference_evolve(q, k, tau, mod.decay)
    if mod.q_norm is not None:
        q = F.layer_norm(q, (hd,), mod.q_norm.weight, mod.q_norm.bias)
        k = F.layer_norm(k, (hd,), mod.k_norm.weight, mod.k_norm.bias)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return mod.proj(y.reshape(B, T, D))


def woken_module(layer_idx=0, dtype=torch.float64, **te_fields) -> te.TrueEvolvingAttention:
    torch.manual_seed(0)
    mod = te.TrueEvolvingAttention(cfg_with(**te_fields), layer_idx).to(dtype)
    randomize_zero_params(mod, seed=1)  # W_o starts at zero, which would hide everything
    with torch.no_grad():  # trained-size frequencies, so tau is far from linear in t
        mod.evolution_weights.normal_(0.0, 1.0)
    return mod.eval()


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_conv_form_equals_the_loop(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    B, T, H, hd = 2, 64, 3, 8
    q, k = (torch.randn(B, T, H, hd, generator=gen, dtype=dtype) for _ in range(2))
    tau = te.temporal_signal(T, 1, 0.1, torch.randn(H, hd, generator=gen, dtype=dtype)).to(dtype)
    ref_q, ref_k = reference_evolve(q, k, tau, GAMMA)
    got_q, got_k = te.evolve(q, k, tau, GAMMA, taps=T)  # taps >= T: the conv is exact
    scale = ref_q.abs().max()
    assert (got_q - ref_q).abs().max() / scale <= tol
    assert (got_k - ref_k).abs().max() / scale <= tol
    # More taps than positions changes nothing.
    assert torch.equal(te.evolve(q, k, tau, GAMMA, taps=1000)[0], got_q)


def test_truncated_kernel_deviates_by_gamma_to_the_taps():
    T, K = 64, 8
    # u = 1 everywhere: exact m_t = (1 - g^(t+1)) / (1 - g); K taps give (1 - g^min(t+1, K)) / (1 - g).
    u = torch.ones(1, T, 1, 1, dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64)
    m = te.decayed_memory(u, GAMMA, K)[0, :, 0, 0]
    assert torch.allclose(m, (1 - GAMMA ** torch.clamp(t + 1, max=K)) / (1 - GAMMA), rtol=0, atol=1e-12)
    # Against the loop, q~ at t = T-1 is off by g (g^K - g^(T-1)) / (1 - g): the dropped tail.
    zero = torch.zeros(T, 1, 1, dtype=torch.float64)
    dev = (te.evolve(u, u, zero, GAMMA, K)[0] - reference_evolve(u, u, zero, GAMMA)[0]).abs()
    expected = GAMMA * (GAMMA ** K - GAMMA ** (T - 1)) / (1 - GAMMA)
    assert dev.max().item() == pytest.approx(expected, rel=1e-9)
    assert dev[0, :K + 1].max() <= 1e-12  # positions t <= K see no dropped term (rounding only)
    # Random inputs: the error is positive but bounded by g^(K+1) max|u| / (1 - g).
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, T, 2, 4, generator=gen, dtype=torch.float64)
    dev = (te.evolve(q, q, zero, GAMMA, K)[0] - reference_evolve(q, q, zero, GAMMA)[0]).abs().max()
    assert 0 < dev <= GAMMA ** (K + 1) * q.abs().max() / (1 - GAMMA)


def test_temporal_signal_formula_and_layer_dependence():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=gen)
    tau0, tau1 = te.temporal_signal(16, 0, 0.1, w), te.temporal_signal(16, 1, 0.1, w)
    assert tau0.shape == (16, 1, 8)
    t = torch.arange(16.0)[:, None, None]
    assert torch.allclose(tau1, torch.sin(0.1 * (t + 1) * 2 * w), atol=1e-6)
    assert (tau0 - tau1).abs().max() > 0.1  # layer 0 and layer 1 see different position signals
    assert te.temporal_signal(16, 0, 0.1, torch.randn(4, 8)).shape == (16, 4, 8)  # per-head
    assert torch.equal(te.temporal_signal(5, 0, 0.1, w), tau0[:5])  # depends on t only, not T


@pytest.mark.parametrize("te_fields", [{}, {"per_head_weights": True, "qk_layernorm": True}])
def test_module_equals_explicit_attention(te_fields):
    mod = woken_module(layer_idx=1, **te_fields)
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got, ref = mod(x), reference_attention(mod, x)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-6
    # The module with the kernel truncated below T differs from the reference by about g^taps.
    short = woken_module(layer_idx=1, kernel_taps=4, **te_fields)
    with torch.no_grad():
        assert (short(x) - ref).abs().max() / ref.abs().max() > 1e-6


def test_layer_index_changes_the_output():
    a, b = woken_module(layer_idx=0), woken_module(layer_idx=1)
    b.load_state_dict(a.state_dict())  # identical weights, only l differs
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-3


def test_prefix_of_the_module_is_its_own_prefix():
    mod = woken_module(kernel_taps=8)  # truncation on: still a function of x_{<=t} only
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        full = mod(x)
        for k in (1, 7, 9, 39):
            assert (mod(x[:, :k]) - full[:, :k]).abs().max() <= 1e-12


def test_bf16_autocast_keeps_one_dtype_for_sdpa():
    mod = woken_module(dtype=torch.float32, qk_layernorm=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(torch.randn(2, 8, 64))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- init, counts, routing


def test_gqa_is_refused():
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_model(replace(CFG, num_kv_heads=2))


@pytest.mark.parametrize("te_fields,extra", [({}, 16), ({"per_head_weights": True}, 4 * 16),
                                             ({"qk_layernorm": True}, 16 + 4 * 16)])
def test_parameter_count_and_init(te_fields, extra):
    torch.manual_seed(0)
    model = build_model(cfg_with(**te_fields))
    d = 64
    for block in model.blocks:  # 4 d^2 for q, k, v, o; |w| = Dh or H*Dh; LayerNorms 2 * 2 * Dh
        assert sum(p.numel() for p in block.attn.parameters()) == 4 * d * d + extra
        assert torch.count_nonzero(block.attn.proj.weight) == 0
    causal = build_model(replace(CFG, attention="causal"))  # q, k, v, o plus H q_gains at MHA
    assert model.num_params() - causal.num_params() == 2 * (extra - 4)
    w = torch.cat([te.TrueEvolvingAttention(replace(CFG, model_dim=256, num_heads=1, num_kv_heads=1), 0)
                   .evolution_weights for _ in range(4)])
    assert w.mean().abs() < 0.003 and 0.018 < w.std() < 0.022  # N(0, 0.02^2), 1024 draws


@pytest.mark.parametrize("per_head", [False, True])
def test_evolution_weights_are_scalar_group_and_fp32(per_head):
    model = build_model(cfg_with(per_head_weights=per_head))
    groups = {n: g for g, params in model.param_groups().items() for n, _ in params}
    plan = {e["name"]: e["scheme"] for e in resolve_plan(named_shapes_of(model), QuantConfig(), param_roles(model))}
    for i in range(2):
        name = f"blocks.{i}.attn.evolution_weights"
        assert groups[name] == "scalar" and plan[name] == "fp32"
        for lin in ("c_q", "c_k", "c_v", "proj"):
            assert groups[f"blocks.{i}.attn.{lin}.weight"] == "matrix"
            assert plan[f"blocks.{i}.attn.{lin}.weight"] != "fp32"


# ----------------------------------------------------------------------------- causality audit


def audited(te_fields=None):
    torch.manual_seed(0)
    model = build_model(cfg_with(**(te_fields or {}))).float().eval()
    randomize_zero_params(model, seed=0)
    return {r.test: r for r in audit_model(model, CFG.vocab_size, seq_len=32)}


@pytest.mark.parametrize("te_fields", [{}, {"per_head_weights": True, "qk_layernorm": True, "kernel_taps": 8}])
def test_audit_passes(te_fields):
    results = audited(te_fields)
    assert len(results) == 7
    for r in results.values():
        assert r.passed and r.max_dev <= 1e-6, r.line()


def test_non_causal_sdpa_is_caught(monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: sdpa(q, k, v, **{**kw, "is_causal": False}))
    results = audited()
    for k in (1, 16, 31):
        r = results[f"future_perturbation@{k}"]
        assert not r.passed and r.max_dev > 1e-3 and r.culprit == "blocks.0.attn", r.line()
    assert not results["jacobian"].passed


def test_centred_memory_convolution_is_caught(monkeypatch):
    def centred(u, decay, taps):  # the kernel padded on both sides: m_t sees u_{t+1..}
        B, T, H, Dh = u.shape
        kern = decay ** torch.arange(taps - 1, -1, -1, dtype=u.dtype)
        rows = u.permute(0, 2, 3, 1).reshape(-1, 1, T)
        m = F.conv1d(rows, kern.view(1, 1, -1), padding=taps // 2)[..., :T]
        return m.reshape(B, H, Dh, T).permute(0, 3, 1, 2)

    monkeypatch.setattr(te, "decayed_memory", centred)
    results = audited({"kernel_taps": 8})
    r = results["future_perturbation@16"]
    assert not r.passed and r.culprit == "blocks.0.attn", r.line()


def test_recipe_switches_the_part_on():
    recipe = load_recipe("true_evolving")
    assert recipe.model.attention == "true_evolving"
    assert recipe.model.num_kv_heads == recipe.model.num_heads
    assert recipe.name == "true_evolving"
