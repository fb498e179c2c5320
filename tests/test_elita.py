"""ELiTA Attention2 / FeedForward2 (pipeline/model/parts/elita.py, seed_components.md §3).

Each maths claim is checked against an independent formula: the explicit per-row softmax
over {j <= i} plus a self slot, the gate-and-prefix-mean "simplified view", the FF2 einsum,
parameter counts by formula, and the causality battery on a 2-layer model (fixed positions pass
exactly; the published length-normalised positions fail prefix consistency only).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline.audit import audit_model, randomize_zero_params
from pipeline.config import QuantConfig
from pipeline.export.plan import named_shapes_of, resolve_plan
from pipeline.model.compose import model_config, replace_model
from pipeline.model.parts.elita import ElitaAttention, ElitaConfig, ElitaFeedForward
from pipeline.model.roles import param_roles
from pipeline.model.registry import build_model
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = model_config(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=2,
                    attention="elita", mlp="elita_ff2",
                    elita=ElitaConfig(position_width=3, value_width=5, position_len=20, ff_width=12, ff_rank=3))
AUDIT = model_config(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=4,
                    attention="elita", mlp="elita_ff2", elita=ElitaConfig(position_len=48, ff_rank=3))


@torch.no_grad()
def trained_scale_positions(module, seed=0):
    """Position params at a trained-like scale (init's +-0.05 makes positions nearly inert)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, ElitaAttention):
            for name, std in (("a1", 3.0), ("a2", 3.0), ("b1", 1.0), ("b2", 1.0), ("c", 1.0)):
                p = getattr(m, f"elita_pos_{name}")
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def attention(cfg=SMALL, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = ElitaAttention(cfg, 0)
    randomize_zero_params(m, seed)  # O is zero-initialised
    return trained_scale_positions(m, seed).to(dtype).eval()


def inputs(T=12, B=2, d=16, dtype=torch.float64, seed=1):
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@torch.no_grad()
def explicit_softmax_attention(m: ElitaAttention, x: torch.Tensor) -> torch.Tensor:
    """Row i: softmax over logits {kappa_j + eta_i : j <= i} and the self slot delta_i, from the
    raw parameters with plain loops (no cumsums, no clip), then the head mix with O."""
    B, T, d = x.shape
    H, a, L = m.H, m.a, m.position_len
    k = m.c_score.weight.view(3, H, d)
    Vw = m.c_v.weight.view(H, a, d)
    pos = {n: getattr(m, f"elita_pos_{n}") for n in ("a1", "a2", "b1", "b2", "c")}

    def p(which, h, i):
        n = i / (L - 1)
        return sum(pos["c"][h, q] * math.sin(pos["a" + which][h, q] * n + pos["b" + which][h, q])
                   for q in range(m.P))

    out = torch.zeros(B, T, d, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            v = x[b] @ Vw[h].T  # [T, a]
            kappa = [x[b, j] @ k[0, h] + p("1", h, j) for j in range(T)]
            for i in range(T):
                eta, delta = x[b, i] @ k[2, h] + p("2", h, i), x[b, i] @ k[1, h]
                logits = torch.stack([kappa[j] + eta for j in range(i + 1)] + [delta])
                w = torch.softmax(logits, dim=0)
                y = (w[:-1, None] * v[: i + 1]).sum(0) + w[-1] * v[i]
                out[b, i] += m.proj.weight[:, h * a:(h + 1) * a] @ y
    return out


def test_attention_equals_explicit_row_softmax():
    m = attention()
    x = inputs()
    ref = explicit_softmax_attention(m, x)
    assert ref.abs().max() > 0.1
    assert (m(x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    m32 = m.float()
    assert (m32(x.float()).double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_simplified_view_query_term_only_gates():
    # y_i = g_i v_i + (1 - g_i) r_i, r_i = sum_j C_j v_j / Z_i, g_i = sigmoid(delta_i - eta_i - log Z_i)
    m, x = attention(), inputs()
    with torch.no_grad():
        kappa, delta, eta = m.scores(x)
        v = m.values(x)
        Z = torch.cumsum(kappa.exp(), dim=1)
        r = torch.cumsum(kappa.exp()[..., None] * v, dim=1) / Z[..., None]
        g = torch.sigmoid(delta - eta - Z.log())[..., None]
        y = m.heads(x)
        assert (y - (g * v + (1 - g) * r)).abs().max() <= 1e-12
        # Changing k3 (the query-side term) moves y, but the pool r it mixes in stays put.
        m.c_score.weight[2 * m.H:] += 0.5
        _, _, eta2 = m.scores(x)
        g2 = torch.sigmoid(delta - eta2 - Z.log())[..., None]
        y2 = m.heads(x)
        assert (y2 - y).abs().max() > 1e-3
        assert ((y2 - g2 * v) / (1 - g2) - r).abs().max() <= 1e-10


@torch.no_grad()
def test_fixed_scale_equals_published_positions_at_position_len():
    L = SMALL.elita.position_len
    fixed = attention()
    published = ElitaAttention(replace_model(SMALL, elita=replace(SMALL.elita, length_normalised_positions=True)), 0)
    published.load_state_dict(fixed.state_dict())
    published.double()
    x = inputs(T=L)
    assert torch.equal(fixed(x), published(x))  # identical at the training length ...
    assert (fixed(x[:, :7]) - published(x[:, :7])).abs().max() > 1e-3  # ... not on shorter windows
    # Prefix consistent (to rounding: BLAS blocks a 7-row and a 20-row matmul differently).
    assert (fixed(x[:, :7]) - fixed(x)[:, :7]).abs().max() <= 1e-12


def audited(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_zero_params(model, seed=0)
    return {r.test: r for r in audit_model(trained_scale_positions(model).eval(), cfg.vocab_size)}


def test_audit_passes_with_fixed_positions():
    r = audited(AUDIT)
    assert len(r) == 7 and all(x.passed for x in r.values()), [x.line() for x in r.values()]
    assert all(x.max_dev <= 1e-6 for x in r.values())
    # Inclusive cumsums and per-token maths only: the past is bit-identical, not merely close.
    assert all(r[t].max_dev == 0.0 for t in ("future_perturbation@1", "future_perturbation@16",
                                             "future_perturbation@31", "jacobian", "batch_independence"))


def test_length_normalised_positions_fail_prefix_consistency_only():
    r = audited(replace_model(AUDIT, elita=replace(AUDIT.elita, length_normalised_positions=True)))
    p = r["prefix_consistency"]
    assert not p.passed and p.max_dev > 1e-3
    assert re.fullmatch(r"blocks\.[01]\.attn", p.culprit), p.culprit
    assert [t for t, x in r.items() if not x.passed] == ["prefix_consistency"]  # no token leaks


class WindowMaxElita(ElitaAttention):
    """The tempting stabiliser §3.2 warns against: subtract the max logit over the whole window."""

    def heads(self, x):
        kappa, delta, eta = self.scores(x)
        v = self.values(x)
        C = torch.exp(kappa - kappa.amax(dim=1, keepdim=True))[..., None]
        D, E = (torch.exp(s.clamp(-20, 20))[..., None] for s in (delta, eta))
        mmax = kappa.amax(dim=1, keepdim=True)[..., None]
        return (E * torch.cumsum(C * v, 1) + D * v * torch.exp(-mmax)) / (E * torch.cumsum(C, 1) + D * torch.exp(-mmax))


def test_window_max_subtraction_breaks_bitwise_causality():
    torch.manual_seed(0)
    good = attention(dtype=torch.float32)
    bad = WindowMaxElita(SMALL, 0)
    bad.load_state_dict(good.state_dict())
    x = inputs(T=16, dtype=torch.float32)
    xp = x.clone()
    xp[:, 8:] = 6.0 * torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5))  # new window max
    with torch.no_grad():
        assert torch.equal(good(x)[:, :8], good(xp)[:, :8])
        assert (bad(x) - good(x)).abs().max() <= 1e-4  # the same function in exact arithmetic
        assert not torch.equal(bad(x)[:, :8], bad(xp)[:, :8])  # but rounding now sees the future


def test_ff2_equals_einsum_over_w3():
    torch.manual_seed(0)
    ff = ElitaFeedForward(SMALL, 0)
    randomize_zero_params(ff, 0)  # W3' and the biases are zero-initialised
    ff.double()
    x = inputs()
    A, r, d = SMALL.elita.ff_width, SMALL.elita.ff_rank, SMALL.model_dim
    u = F.silu(x @ ff.fc_u.weight.T + ff.fc_u.bias)
    z = F.silu(x @ ff.fc_z.weight.T + ff.fc_z.bias)
    W3 = ff.proj.weight.T.reshape(A, r, d)  # W3[i, j, :]
    ref = torch.einsum("bti,btj,ijd->btd", u, z, W3) + ff.proj.bias
    assert ref.abs().max() > 0.01
    assert (ff(x) - ref).abs().max() <= 1e-12


def test_parameter_counts_by_formula():
    e, d = SMALL.elita, SMALL.model_dim
    H, P, a, A, r = SMALL.num_heads, e.position_width, e.value_width, e.ff_width, e.ff_rank

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(ElitaAttention(SMALL, 0)) == 3 * H * d + 5 * H * P + 2 * H * d * a
    assert count(ElitaFeedForward(SMALL, 0)) == d * A + A + d * r + r + A * r * d + d
    dflt = replace_model(SMALL, elita=ElitaConfig(position_width=3))  # a = d / H, A = d, r = 8
    assert count(ElitaAttention(dflt, 0)) == 3 * H * d + 5 * H * 3 + 2 * d * d
    assert count(ElitaFeedForward(dflt, 0)) == 9 * d * d + 10 * d + 8


def test_routing_and_export_names():
    model = build_model(SMALL)
    routes = {n: model.route_param(n, p) for n, p in model.named_parameters() if n.startswith("blocks.0.")}
    roles = param_roles(model)
    plan = {e["name"]: e["scheme"] for e in resolve_plan(named_shapes_of(model), QuantConfig(), roles)}
    for n in ("attn.c_score.weight", "attn.c_v.weight", "attn.proj.weight",
              "mlp.fc_u.weight", "mlp.fc_z.weight", "mlp.proj.weight"):
        assert routes[f"blocks.0.{n}"] == "matrix", n  # Muon; and `.attn.`/`.mlp.` -> int6 rule
        assert re.search(r"\.(attn|mlp)\.", f"blocks.0.{n}") and roles[f"blocks.0.{n}"] == "matrix"
    for q in ("a1", "a2", "b1", "b2", "c"):
        name = f"blocks.0.attn.elita_pos_{q}"
        assert routes[name] == "scalar" and roles[name] == "control" and plan[name] == "fp32"  # Adam, fp32


def test_init_statistics():
    cfg = replace_model(AUDIT, elita=ElitaConfig(value_width=24))
    torch.manual_seed(0)
    attn, ff = ElitaAttention(cfg, 0), ElitaFeedForward(cfg, 0)
    d, H, a = cfg.model_dim, cfg.num_heads, 24
    uniform = [attn.c_score.weight] + [getattr(attn, f"elita_pos_{q}") for q in ("a1", "a2", "b1", "b2", "c")]
    flat = torch.cat([p.detach().reshape(-1) for p in uniform])
    assert flat.abs().max() <= 0.05 and abs(flat.std().item() / (0.05 / math.sqrt(3)) - 1) < 0.1
    limit = math.sqrt(6 / (H * (d + a)))
    assert attn.c_v.weight.abs().max() <= limit
    assert abs(attn.c_v.weight.std().item() / (limit / math.sqrt(3)) - 1) < 0.05
    for w in (ff.fc_u.weight, ff.fc_z.weight):
        assert abs(w.std().item() * math.sqrt(d) - 1) < 0.1
    for t in (attn.proj.weight, ff.proj.weight, ff.proj.bias, ff.fc_u.bias, ff.fc_z.bias):
        assert torch.count_nonzero(t) == 0
    x = inputs(T=8, d=d, dtype=torch.float32)
    assert torch.count_nonzero(attn(x)) == 0 and torch.count_nonzero(ff(x)) == 0  # identity blocks


def test_bf16_autocast_leaves_attention_in_fp32():
    m = attention(dtype=torch.float32)
    x = inputs(dtype=torch.float32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, m.c_v.weight).dtype == torch.bfloat16  # autocast is live here ...
        out = m(x)
        out_bf = m(x.bfloat16())
    assert out.dtype == torch.float32 and torch.equal(out, ref)  # ... but not inside the block
    # A bf16 input is computed in fp32 and rounded once at the end.
    assert out_bf.dtype == torch.bfloat16 and torch.equal(out_bf, m(x.bfloat16().float()).bfloat16())


def test_large_inputs_stay_finite():
    m = attention(dtype=torch.float32).requires_grad_(True)
    x = (1e3 * inputs(dtype=torch.float32)).requires_grad_(True)
    with torch.no_grad():
        assert max(s.abs().max() for s in m.scores(x)) > 100  # exp would overflow fp32 unclipped
    out = m(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_recipe_matches_tiny_scale():
    recipe, tiny = load_recipe("elita"), load_recipe("tiny")
    m = recipe.model
    assert (m.attention, m.mlp, m.elita.length_normalised_positions) == ("elita", "elita_ff2", False)
    assert m.elita.position_len == recipe.train.seq_len  # fixed scale == author's at training length
    with torch.device("meta"):
        n, n_tiny = build_model(m).num_params(), build_model(tiny.model).num_params()
    assert abs(n / n_tiny - 1) < 0.03, (n, n_tiny)
