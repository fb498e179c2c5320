"""PR #298's depth-recurrent trunk: exact size, causality with and without the leak, the exit
gate's forward no-op, the loss terms and optimizer routing. Tiny shapes, CPU, fp32."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.model.compose import model_config, replace_model
from pipeline.model.parts.rotary import RopeConfig
from pipeline.model.recurrent import DepthRecurrentGPT, RecurrentConfig, mean_softmax_entropy, thermo_term
from pipeline.model.recurrent_parts import SelectiveState, binary_entropy, gate_gradient

T, V = 32, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**recurrent) -> ModelConfig:
    leaky = recurrent.pop("leaky", False)
    return model_config(trunk="depth_recurrent", vocab_size=V, model_dim=64, num_heads=4, num_kv_heads=2,
                        mlp_mult=2.0, rope=RopeConfig(base=500000.0), leaky_selective_state=leaky,
                        recurrent=RecurrentConfig(k_rank=8, td_rank=4, gru_rank=4, **recurrent))


def build(cfg: ModelConfig, seed: int = 0, randomize_zeros: bool = True) -> DepthRecurrentGPT:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if randomize_zeros:
        # Zero-init parameters (value_embeds, output projections, B factors, C_p, g_p, exit w)
        # would hide whole paths; give them values so every path is live.
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(std=0.1)
    return model


def ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_param_count_matches_pr298_exactly():
    cfg = model_config(trunk="depth_recurrent", vocab_size=1024, model_dim=768, num_heads=8, num_kv_heads=2,
                       mlp_mult=2.0, rope=RopeConfig(base=500000.0))
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, DepthRecurrentGPT)
    assert model.num_params() == 12_836_767
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    block = sum(v for n, v in sizes.items() if n.startswith("blocks.0."))
    assert block == 589_824 + 24_576 + 6_144 + 147_456 + 589_824 + 2 * 1_179_648 + 8
    assert sizes["blocks.0.attn.c_k_a.weight"] == 768 * 32 and sizes["blocks.0.attn.c_k_b.weight"] == 32 * 192
    control = sum(v for n, v in sizes.items() if n.startswith("control."))
    assert control == 9 * 3_072
    assert sizes["skip_weight"] == 2_304
    assert sizes["resonant.freq"] + sizes["resonant.scale"] == 3 * (384 + 1)
    assert sum(v for n, v in sizes.items() if n.startswith("gru.")) == 4 * 12_288 + 3 * 768
    assert sizes["exit_proj.weight"] + sizes["exit_proj.bias"] == 769
    assert len(model.blocks) == 3


def test_forward_shape_finite_and_pure():
    model = build(tiny_cfg())
    x = ids()
    logits = model(x)
    assert logits.shape == (2, T, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= 30.0  # softcap
    assert torch.equal(model(x), logits)  # nothing carried between calls


def test_init_values():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert torch.equal(model.value_embeds.weight, torch.zeros(V, 64))
    assert abs(model.tok_emb.weight.std().item() - 0.1 / 8) < 0.002  # spectral: 0.1 / sqrt(64)
    assert torch.equal(model.exit_proj.weight, torch.zeros(1, 64)) and model.exit_proj.bias.item() == 2.0
    assert torch.equal(model.td.alpha_td, torch.full((3,), 0.1))
    assert torch.equal(model.grad_memory.mem_vec, torch.full((3, 64), 0.1))
    assert torch.equal(model.resonant.scale, torch.full((3,), 0.1))
    assert torch.equal(model.control.resid_mix[:, 0], torch.ones(9, 64))
    assert torch.equal(model.control.resid_mix[:, 1], torch.zeros(9, 64))
    assert not model.gru.z_b.weight.any() and not model.td.b.weight.any()
    assert 0.005 < model.gru.z_a.weight.std().item() < 0.015


def _last_token_change(model) -> torch.Tensor:
    a = ids()
    b = a.clone()
    b[:, -1] = (b[:, -1] + 1) % V
    with torch.no_grad():
        return (model(a) - model(b))[:, :-1].abs().max()


def test_causal_by_default_exactly():
    model = build(tiny_cfg())
    assert model.causal is True
    assert _last_token_change(model).item() == 0.0


def test_leaky_flag_reproduces_the_leak():
    model = build(tiny_cfg(leaky=True))
    assert model.causal is False
    assert _last_token_change(model).item() > 1e-6
    # The leak is exactly the selective state: switched off, the leaky flag is harmless.
    no_state = build(tiny_cfg(leaky=True, selective_state=False))
    assert no_state.causal is True and _last_token_change(no_state).item() == 0.0


def test_selective_state_prefix_vs_full_mean():
    x = torch.randn(2, 5, 3)
    causal = SelectiveState()(x)
    leaky = SelectiveState(leaky=True)(x)
    assert causal.shape == leaky.shape == x.shape
    assert torch.allclose(causal[:, 2], x[:, :3].mean(dim=1), atol=1e-6)
    assert torch.allclose(causal[:, -1], x.mean(dim=1), atol=1e-6)
    assert torch.allclose(leaky[:, 0], x.mean(dim=1), atol=1e-6)


def test_exit_gate_is_a_forward_noop():
    # Confidence off, so the gate's only forward consumer is gone; the gate itself must not
    # change a single bit of the logits.
    with_gate = build(tiny_cfg(confidence=False))
    without = build_model(tiny_cfg(confidence=False, exit_gate=False)).eval()
    missing, unexpected = without.load_state_dict(with_gate.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == {"exit_proj.weight", "exit_proj.bias"}
    x = ids()
    with torch.no_grad():
        assert torch.equal(with_gate(x), without(x))


def test_gate_gradient_value_and_grad():
    x = torch.randn(2, 3, 4, requires_grad=True)
    g = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]], requires_grad=True)
    y = gate_gradient(x, g)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, g.detach().unsqueeze(-1).expand(2, 3, 4))
    assert torch.equal(g.grad, torch.zeros_like(g))  # no CE gradient reaches the gate


def test_binary_entropy_values():
    h = binary_entropy(torch.tensor([0.5, 1.0]))
    assert math.isclose(h[0].item(), math.log(2), rel_tol=1e-6)
    assert abs(h[1].item()) < 1e-6


def test_thermo_term_hand_computed():
    rc = RecurrentConfig()
    logits = torch.zeros(2, 3, 10)  # uniform softmax: mean entropy exactly ln 10
    assert math.isclose(mean_softmax_entropy(logits).item(), math.log(10), rel_tol=1e-6)
    assert math.isclose(thermo_term(logits, 0, rc).item(), -0.025 * math.log(10), rel_tol=1e-6)
    at_tau = thermo_term(logits, 5000, rc).item()
    assert math.isclose(at_tau, -0.05 * 0.5 * math.exp(-1) * math.log(10), rel_tol=1e-6)


def test_training_loss_terms():
    model = build(tiny_cfg()).train()
    x, y = ids(1), ids(2)
    loss, parts = model.training_loss(x, y, step=0)
    assert set(parts) == {"ce", "td_aux", "gate_aux", "thermo"}
    assert torch.isfinite(loss)
    assert math.isclose(loss.item(), sum(parts.values()), rel_tol=1e-5)
    with torch.no_grad():
        logits = model(x)
        p = torch.softmax(logits, dim=-1)
        h_bar = -(p * torch.log(p)).sum(-1).mean().item()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).item()
    assert math.isclose(parts["thermo"], -0.025 * h_bar, rel_tol=1e-5)
    assert math.isclose(parts["ce"], ce, rel_tol=1e-6)
    assert parts["td_aux"] > 0 and parts["gate_aux"] > 0
    # Gate entropy at init: two gates (passes 0 and 1), w = 0, b = 2 -> 0.005 * 2 * H(sigmoid(2)).
    fresh = build_model(tiny_cfg())
    _, p0 = fresh.training_loss(x, y, step=0)
    g = 1 / (1 + math.exp(-2.0))
    h = -(g * math.log(g) + (1 - g) * math.log(1 - g))
    assert math.isclose(p0["gate_aux"], 0.005 * 2 * h, rel_tol=1e-5)
    loss.backward()
    assert model.exit_proj.weight.grad is not None and model.td.a.weight.grad is not None


def test_switches_off():
    model = build(tiny_cfg(thermo=False, temporal_difference=False, exit_gate=False))
    loss, parts = model.training_loss(ids(1), ids(2), step=3)
    assert parts["thermo"] == parts["td_aux"] == parts["gate_aux"] == 0.0
    assert math.isclose(loss.item(), parts["ce"], rel_tol=1e-6)
    bare = build(tiny_cfg(value_embeds=False, resonant_pe=False, selective_state=False, confidence=False,
                          grad_memory=False, temporal_difference=False, exit_gate=False))
    kept = ("tok_emb", "blocks", "control", "skip_weight")
    assert all(name.startswith(kept) for name, _ in bare.named_parameters())
    assert torch.isfinite(bare(ids())).all()


def test_routing():
    model = build_model(tiny_cfg())
    named = dict(model.named_parameters())
    expected = {
        "tok_emb.weight": "embed", "value_embeds.weight": "embed",
        "blocks.0.attn.c_q.weight": "matrix", "blocks.1.attn.c_k_a.weight": "matrix",
        "blocks.2.attn.c_k_b.weight": "matrix", "blocks.0.mlp.fc.weight": "matrix",
        "exit_proj.weight": "matrix", "gru.z_a.weight": "matrix", "gru.h_b.weight": "matrix",
        "td.a.weight": "matrix", "td.b.weight": "matrix",
        "blocks.0.attn.q_gain": "scalar", "exit_proj.bias": "scalar", "control.resid_mix": "scalar",
        "control.attn_scale": "scalar", "skip_weight": "scalar", "resonant.freq": "scalar",
        "resonant.scale": "scalar", "gru.gru_gate": "scalar", "confidence.conf_vec": "scalar",
        "grad_memory.mem_vec": "scalar", "td.alpha_td": "scalar",
    }
    for name, group in expected.items():
        assert model.route_param(name, named[name]) == group, name
    groups = model.param_groups()
    assert len(groups["matrix"]) == 3 * 7 + 4 + 2 + 1 and groups["head"] == []


def test_options_the_trunk_does_not_implement_are_refused():
    # A unet_gpt flag, a unet_gpt setting and an attention part: depth_recurrent takes none of them,
    # in code (model_config / replace_model) as at load (tests/test_part_mechanism.py).
    with pytest.raises(UserError, match=r"model.kv_shift_mix: trunk 'depth_recurrent' does not implement it "
                                        r"\(read by attention 'causal'\)"):
        replace_model(tiny_cfg(), kv_shift_mix=True)
    with pytest.raises(UserError, match="model.bigram: trunk 'depth_recurrent' does not implement it"):
        model_config(trunk="depth_recurrent", bigram={"buckets": 64})
    with pytest.raises(UserError, match="model.attention: trunk 'depth_recurrent' takes no attention part"):
        model_config(trunk="depth_recurrent", attention="elita")


def test_parts_compute_the_published_formulas():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    x = torch.randn(2, T, 64)
    with torch.no_grad():
        # GRU carry at init: z = 0.5, h = 0, gate sigmoid(0) = 0.5 -> 0.25 S.
        assert torch.allclose(model.gru(x, 1), 0.25 * x, atol=1e-6)
        # TD at init: B = 0 -> Delta = -sigmoid(0.1) x_in.
        x_in = torch.randn(2, T, 64)
        assert torch.allclose(model.td(x, x_in, 2), -torch.sigmoid(torch.tensor(0.1)) * x_in, atol=1e-6)
        # Gradient memory: m_p |x - x_prev| with m_p = 0.1.
        assert torch.allclose(model.grad_memory(x, x_in, 0), 0.1 * (x - x_in).abs())
        # Resonant PE: x + s_p [cos(t f), cos(t f)] x; t = 5 is exact in bf16.
        f, s = model.resonant.freq[1], model.resonant.scale[1]
        r5 = torch.cos(5 * f).repeat(2)
        assert torch.allclose(model.resonant(x, 1)[:, 5], x[:, 5] + s * r5 * x[:, 5], atol=1e-6)
        # Positions are rounded through bf16 as in #298: t = 257 acts as t = 256.
        long = torch.ones(1, 300, 64)
        out = model.resonant(long, 0)
        assert torch.equal(out[0, 257], out[0, 256]) and not torch.equal(out[0, 255], out[0, 256])
        # RoPE in #298's direction: pair (x1, x2) at position t -> (x1 cos + x2 sin, x2 cos - x1 sin).
        attn = model.blocks[0].attn
        q = torch.zeros(1, 2, 1, attn.hd)
        q[..., 0] = 1.0  # x1 of the first pair, whose frequency is base^0 = 1
        rotated = attn._rope(q)
        assert torch.allclose(rotated[0, 1, 0, 0], torch.cos(torch.tensor(1.0)), atol=1e-6)
        assert torch.allclose(rotated[0, 1, 0, attn.hd // 2], -torch.sin(torch.tensor(1.0)), atol=1e-6)
