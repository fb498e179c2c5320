"""The frontier stack's model parts and optimizer options (recipes/frontier.yaml, the 1.0611 record):
the parameter count, the looped layer order and its training schedule, two-lane and GPT-J parallel
residuals, gated skips, the BOS-masked SmearGate, XSA, the sparse attention gate, LeakyReLU^2,
Polar Express / MuonEq-R Muon, the embedding weight decay, the LR floor, and the audit of every
part (with broken variants that it must catch).

    .venv/bin/python -m pytest -q tests/test_frontier.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_at, make_trainer, tiny_recipe
from pipeline.audit import audit_model, randomize_zero_params, shrink_model_config
from pipeline.config import OptimConfig, TrainConfig, to_dict
from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.model.compose import model_config, replace_model
from pipeline.model.looped import LoopConfig, ParallelConfig, layer_order
from pipeline.model.parts.input_smear import InputSmearConfig, InputSmearGate
from pipeline.model.parts.rotary import RopeConfig
from pipeline.model.parts.xsa_attention import SparseAttnGateConfig, XSAAttention, exclusive_self_attention
from pipeline.model.roles import param_roles
from pipeline.optim.build import build_optimizers
from pipeline.optim.muon import Muon, newton_schulz
from pipeline.optim.muon_variants import orthogonaliser, polar_express, row_normalize
from pipeline.optim.schedule import lr_multiplier
from pipeline.recipe import load_recipe
from pipeline.stages.train import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

# frontier at 2 layers x 32: the loop is layer 0 x 3 (virtual order 0 0 0 1), layer 1 two-lane; LoRA TTT chunks
# that fit conftest's 32-token windows.
TINY_FRONTIER = ("model.loop.start=0", "model.loop.end=0", "model.parallel.start_layer=1", "model.rope.dims=8",
                 "model.loop.enable_at=0.5", "train.prime_steps=0", "ttt.lora_chunk_tokens=16")


def tiny_cfg(**changes):
    """A 2-layer d=32 looped_gpt with every frontier part on (BOS = 1)."""
    base = dict(trunk="looped_gpt", vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                mlp_mult=2.0, attention="xsa", mlp="leaky_relu2", rope=RopeConfig(dims=4), qk_gain_init=5.0,
                ln_scale=True, init="orthogonal",
                skip_gates=True, loop=LoopConfig(start=0, end=0, passes=3, enable_at=0.5),
                parallel=ParallelConfig(start_layer=1), input_smear=InputSmearConfig(),
                attn_gate=SparseAttnGateConfig(scale=0.5))
    return model_config(**(base | changes))


def live_model(cfg, seed=0):
    """`cfg`'s model in fp64 with every zero/constant parameter given small random values."""
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    randomize_zero_params(model, seed, std=0.2)
    return model


# ----------------------------------------------------------------------------- the record's model


def test_frontier_has_the_records_parameter_count_and_derivation():
    r = load_recipe("frontier")
    with torch.device("meta"):
        model = build_model(r.model)
    n = {name: p.numel() for name, p in model.named_parameters()}
    L, D, V, kv, hidden = 11, 512, 8192, 256, 2048
    matrices = L * (D * D + 2 * kv * D + D * D + 2 * hidden * D)  # q, k, v, out, MLP up + down
    per_block = 2 * D + 2 * D + 8 + 8 * 12  # attn/mlp scale, resid_mix, q_gain, sparse gate
    expect = V * D + matrices + L * per_block + 2 * 8 * D + L * 6 + 13  # + skips, lanes, smear
    assert (matrices, L * per_block) == (31_719_424, 23_672)
    assert model.num_params() == expect == 35_945_671
    assert n["skip_weights"] == n["skip_gates"] == 8 * D  # sized by the looped order: 8 encoder positions
    assert n["lane_post"] + n["lane_resid"] == 66 and n["smear.gate.weight"] + n["smear.smear_lambda"] == 13
    roles = param_roles(model)
    assert {roles[k] for k in ("skip_gates", "smear.gate.weight", "blocks.3.attn.attn_gate")} == {"gate"}
    assert {roles[k] for k in ("lane_post", "lane_resid", "skip_weights", "smear.smear_lambda")} == {"control"}
    assert roles["blocks.0.mlp.fc.weight"] == roles["blocks.0.attn.c_k.weight"] == "matrix"


def test_layer_orders_match_the_records():
    loop = LoopConfig(start=3, end=5, passes=3)
    assert layer_order(11, loop, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert layer_order(11, loop, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert layer_order(11, None, True) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("sets, match", [
    (("model.loop.end=11",), "model.loop: start"),
    (("model.parallel.start_layer=4",), "two-lane layers must be the decoder's last positions"),
    (("model.unet_skips=false",), "model.skip_gates gates the U-Net skips"),
    (("model.attn_gate.window=600",), "model.attn_gate.window"),
    (("optim.muon_ns_steps=6",), "Polar Express has 5 tuned iterations"),
    (("model.residual=orthopar",), "trunk 'looped_gpt' takes no residual part"),
])
def test_bad_frontier_settings_are_refused_when_the_recipe_loads(sets, match):
    with pytest.raises(UserError, match=match):
        load_recipe("frontier", list(sets))


def test_new_settings_stay_out_of_other_recipes_identity():
    # Settings declared omit_default are written only when set, so existing blobs keep their bytes.
    tiny = to_dict(load_recipe("tiny").model)
    assert not {"loop", "parallel", "skip_gates", "input_smear", "attn_gate", "xsa_from_layer",
                "mlp_leaky_slope"} & set(tiny)
    frontier = to_dict(load_recipe("frontier").model)
    assert frontier["loop"]["enable_at"] == 0.35 and frontier["attn_gate"]["scale"] == 0.5
    assert "xsa_from_layer" not in frontier  # 0 is its default
    assert load_recipe("frontier", ["model.xsa_from_layer=3"]).model.xsa_from_layer == 3


# ----------------------------------------------------------------------------- the loop schedule


def test_looping_switches_on_at_the_fraction_of_max_steps():
    model = build_model(tiny_cfg())
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(RuntimeError, match="plan_training"):
        model.training_loss(ids, ids, 0)
    model.plan_training(100)  # enable_at 0.5 -> step 50
    assert [model.looped_at(s) for s in (0, 49, 50, 99)] == [False, False, True, True]
    calls = []
    for b in model.blocks:  # one attention call per virtual layer
        b.attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    model.training_loss(ids, ids, 49)
    plain, calls[:] = len(calls), []
    loss, _ = model.training_loss(ids, ids, 50)
    assert (plain, len(calls)) == (2, 4)  # virtual order 0 1 -> 0 0 0 1
    with torch.no_grad():  # scoring runs the looped order: the same loss
        assert torch.allclose(loss, F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()))


def test_trainer_loops_from_the_planned_step_and_resumes_bitwise(small_data, tmp_path):
    recipe = tiny_recipe(*TINY_FRONTIER, name="frontier")  # max_steps 12: looping from step 6
    full = make_trainer(recipe, small_data, tmp_path / "full")
    per_step: list[int] = []
    for b in full.model.blocks:
        b.attn.register_forward_pre_hook(lambda m, a: per_step.append(full.step))
    full.run()
    calls = [per_step.count(s) for s in range(12)]
    assert calls == [2] * 6 + [4] * 6

    first = make_trainer(recipe, small_data, tmp_path / "resumed", progress=interrupt_at(4))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["step"] == 4
    second = make_trainer(recipe, small_data, tmp_path / "resumed")
    assert second.run().resumed_from == 4
    for (k, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume across the loop switch"
    assert [h["loss"] for h in full.history] == [h["loss"] for h in second.history]


# ----------------------------------------------------------------------------- residual structure


def _inputs_of(model, names, ids):
    """The first input of each named submodule in one forward of `model`."""
    got = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: got.setdefault(n, a[0].clone())) for n in names]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("mode", ["two_lane", "gptj", None])
def test_parallel_mlp_does_not_read_its_own_layers_attention(mode):
    cfg = tiny_cfg(parallel=ParallelConfig(start_layer=1, mode=mode) if mode else None)
    model, ids = live_model(cfg), torch.randint(0, 64, (2, 12))
    before = _inputs_of(model, ["blocks.1.attn", "blocks.1.mlp"], ids)
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.mul_(3.0)  # change only layer 1's attention output
    after = _inputs_of(model, ["blocks.1.mlp"], ids)
    parallel = torch.equal(before["blocks.1.mlp"], after["blocks.1.mlp"])
    assert parallel == (mode is not None)
    if mode == "gptj":  # both sublayers read the same normalised input
        assert torch.equal(before["blocks.1.attn"], before["blocks.1.mlp"])


def test_two_lane_update_is_the_records_formula():
    model, ids = live_model(tiny_cfg(loop=None)), torch.randint(0, 64, (2, 12))
    blk = model.blocks[1]
    with torch.no_grad():
        x0 = F.rms_norm(model.smear(model.tok_emb(ids), ids), (32,))
        x = model.blocks[0](x0, x0)  # plain order: encoder [0], decoder [1]
        w, g = model.skip_weights[0], torch.sigmoid(model.skip_gates[0])
        lane0, lane1 = torch.lerp(w * x, x, g), x
        mix = blk.resid_mix
        a = blk.attn_scale * blk.attn(F.rms_norm(mix[0] * lane0 + mix[1] * x0, (32,)) / 2 ** 0.5)
        m = blk.mlp_scale * blk.mlp(F.rms_norm(lane1, (32,)) / 2 ** 0.5)
        r, p = model.lane_resid[1], model.lane_post[1]
        lane0, lane1 = r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m
        want = F.rms_norm(0.5 * (lane0 + lane1), (32,))
        assert torch.allclose(model.hidden(ids), want, atol=1e-12)


def test_gated_skip_starts_as_a_half_blend():
    model = build_model(tiny_cfg(loop=None, parallel=None)).double()
    x, skip = torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 3, 32, dtype=torch.float64)
    assert torch.allclose(model._merge_skip(x, skip, 0), 0.5 * x + 0.5 * skip)


# ----------------------------------------------------------------------------- SmearGate and BOS


@pytest.mark.parametrize("mask_bos", [True, False])
def test_smear_mixes_across_a_document_boundary_only_without_the_bos_mask(mask_bos):
    torch.manual_seed(0)
    smear = InputSmearGate(InputSmearConfig(window=4, mask_bos=mask_bos, bos_id=1), 8).double()
    with torch.no_grad():
        smear.gate.weight.normal_()
        smear.smear_lambda.fill_(0.7)
    ids = torch.tensor([[5, 6, 7, 1, 8, 9]])  # document A = 5 6 7, document B = BOS 8 9
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    x_other = x.clone()
    x_other[:, :3] = torch.randn(1, 3, 8, dtype=torch.float64)  # another document A
    a, b = smear(x, ids), smear(x_other, ids)
    doc_b_moved = (a[:, 3:] - b[:, 3:]).abs().max().item()
    assert (doc_b_moved == 0.0) == mask_bos
    assert (a[:, 1:3] - b[:, 1:3]).abs().max() > 0  # inside a document it does mix
    assert torch.equal(smear(x, ids)[:, 0], x[:, 0])  # nothing before position 0


def test_trunk_passes_token_ids_to_the_bos_mask():
    model = live_model(tiny_cfg())
    seen = []
    model.smear.register_forward_hook(lambda m, a, out: seen.append(out))
    ids = torch.tensor([[5, 6, 1, 8], [5, 9, 1, 8]])  # rows differ only before the BOS
    with torch.no_grad():
        model(ids)
    assert torch.equal(seen[0][0, 2:], seen[0][1, 2:])
    unmasked = live_model(tiny_cfg(input_smear=InputSmearConfig(mask_bos=False)))
    unmasked.smear.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        unmasked(ids)
    assert not torch.equal(seen[1][0, 2:], seen[1][1, 2:])


# ----------------------------------------------------------------------------- attention and MLP


def test_xsa_removes_each_heads_own_value_direction_with_gqa_mapping():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, dtype=torch.float64), torch.randn(2, 5, 2, 8, dtype=torch.float64)
    out = exclusive_self_attention(y, v)
    vh = F.normalize(v.repeat_interleave(2, dim=2), dim=-1)  # query head h reads kv head h // 2
    assert (out * vh).sum(-1).abs().max() < 1e-12
    assert torch.allclose(out, y - (y * vh).sum(-1, keepdim=True) * vh)


def test_sparse_gate_reads_the_first_window_channels_and_starts_at_half():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    gated = XSAAttention(cfg, 0).double()
    plain = XSAAttention(replace_model(cfg, attn_gate=None), 0).double()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "attn_gate"})
    with torch.no_grad():
        gated.proj.weight.normal_()
        plain.proj.weight.copy_(gated.proj.weight)
        x = torch.randn(2, 6, 32, dtype=torch.float64)
        assert torch.allclose(gated(x), 0.5 * plain(x))  # W = 0: sigmoid(0) on every head
        gated.attn_gate.normal_()
        g = torch.sigmoid(0.5 * x[..., :12] @ gated.attn_gate.t())  # [B, T, H]
        captured = []
        gated.proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        plain.proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        gated(x), plain(x)
    want = (captured[1].view(2, 6, 4, 8) * g[..., None]).reshape(2, 6, 32)
    assert torch.allclose(captured[0], want)


def test_leaky_relu2_mlp():
    cfg = tiny_cfg()
    mlp = build_model(cfg).blocks[0].mlp.double()
    with torch.no_grad():
        mlp.proj.weight.normal_()
        x = torch.randn(3, 32, dtype=torch.float64)
        h = x @ mlp.fc.weight.t()
        assert torch.allclose(mlp(x), torch.where(h > 0, h, 0.5 * h).square() @ mlp.proj.weight.t())


# ----------------------------------------------------------------------------- causality audit


def test_every_frontier_part_passes_the_audit_in_both_layer_orders():
    model = live_model(shrink_model_config(load_recipe("frontier", ["model.loop.enable_at=0.5"]).model)).float()

    class Plain(torch.nn.Module):  # the training order before the loop switch
        def __init__(self, m):
            super().__init__()
            self.m, self.tok_emb = m, m.tok_emb

        def forward(self, ids):
            return self.m.logits(ids, False)

    for m in (model, Plain(model)):
        # vocab 8 makes BOS (id 1) frequent, so the masked path is exercised too
        results = audit_model(m, 8, seq_len=24)
        assert all(r.passed for r in results), [r.line() for r in results if not r.passed]


def test_audit_catches_a_smear_or_xsa_that_reads_the_next_token(monkeypatch):
    def smear_ahead(self, x, ids):  # x_t <- x_t + x_{t+1}
        return torch.cat((x[:, :-1] + x[:, 1:], x[:, -1:]), dim=1)

    def xsa_ahead(y, v):  # project out the *next* token's value
        return y - 0.5 * torch.cat((v[:, 1:], v[:, -1:]), dim=1).repeat_interleave(y.size(2) // v.size(2), dim=2)

    model = live_model(tiny_cfg()).float()
    for target, fn, culprit in (("pipeline.model.parts.input_smear.InputSmearGate.forward", smear_ahead, "smear"),
                                ("pipeline.model.parts.xsa_attention.exclusive_self_attention", xsa_ahead,
                                 "blocks.0.attn")):
        with monkeypatch.context() as mp:
            mp.setattr(target, fn)
            future = audit_model(model, 64, seq_len=16)[0]
        assert not future.passed and future.culprit == culprit, future.line()


# ----------------------------------------------------------------------------- optimizer


def test_polar_express_tightens_the_singular_values():
    torch.manual_seed(0)
    G = torch.randn(64, 128) @ torch.diag(torch.logspace(-2, 0, 128))
    jordan = torch.linalg.svdvals(newton_schulz(G, 5, dtype=torch.float32))
    pe = torch.linalg.svdvals(polar_express(G, 5, dtype=torch.float32))
    assert jordan.min() < 0.75 and 0.8 < pe.min() and pe.max() < 1.2
    with pytest.raises(ValueError, match="5 tuned iterations"):
        polar_express(G, 6)
    assert torch.allclose(row_normalize(G).norm(dim=-1), torch.ones(64))


def test_muon_variant_step_is_row_normalised_polar_express():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8))
    g, start = torch.randn(16, 8), p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, ns_steps=5, weight_decay=0.5,
               orthogonalise=orthogonaliser("polar_express", True), ns_dtype=torch.float32)
    p.grad = g.clone()
    opt.step()
    d = g + 0.9 * g  # Nesterov on a fresh buffer
    u = polar_express(d / d.norm(dim=-1, keepdim=True), 5, dtype=torch.float32) * (16 / 8) ** 0.5
    assert torch.allclose(p.detach(), start * (1 - 0.1 * 0.5) - 0.1 * u, atol=1e-6)


def test_optimizer_options_default_to_the_plain_path_and_route_the_records_decays():
    model = build_model(tiny_cfg())
    plain = build_optimizers(model, OptimConfig())
    assert plain[0]._ns_fn is newton_schulz and orthogonaliser() is None
    r = load_recipe("frontier").optim
    opts = {o.param_groups[0]["route"]: o for o in build_optimizers(model, r)}
    assert opts["matrix"]._ns_fn.__name__ == "polar_express_row_normalized"
    assert isinstance(opts["embed"], torch.optim.AdamW) and opts["embed"].param_groups[0]["weight_decay"] == 0.085
    assert opts["scalar"].param_groups[0]["weight_decay"] == 0.02
    assert opts["scalar"].param_groups[0]["betas"] == (0.9, 0.99)
    same = {o.param_groups[0]["route"]: o for o in build_optimizers(model, dataclasses.replace(r, embed_wd=None))}
    assert same["embed"].param_groups[0]["weight_decay"] == 0.02


def test_lr_floor_holds_the_warmdown_at_min_lr():
    t = TrainConfig(max_steps=100, warmdown_steps=85, min_lr_mul=0.1)
    assert lr_multiplier(14, t, 0.0) == 1.0
    assert lr_multiplier(50, t, 0.0) == pytest.approx(50 / 85)
    assert lr_multiplier(95, t, 0.0) == 0.1
    assert lr_multiplier(95, dataclasses.replace(t, min_lr_mul=0.0), 0.0) == pytest.approx(5 / 85)
