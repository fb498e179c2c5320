"""Tests for pipeline.optim: Newton–Schulz, Muon (single and two-process gloo), the optimizer
split, schedules and gradient transforms. CPU only, tiny tensors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import OptimConfig, TrainConfig
from pipeline.model.base import LanguageModel
from pipeline.model.roles import set_roles
from pipeline.optim import (Muon, apply_schedule, build_optimizers, clip_grad_norm, lr_multiplier,
                            muon_momentum, nan_to_num_, newton_schulz)

# ----------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(24, 48), (48, 24)])
def test_newton_schulz_singular_values_near_one_and_polar_direction(shape):
    # G = U diag(s) V^T with singular values spread over 2.3 decades, so G is far from its
    # polar factor U V^T and only a real orthogonalisation brings X close to it.
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    G = U @ torch.diag(torch.logspace(1, -1.3, k)) @ V.T
    X = newton_schulz(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.3 and s.max() < 1.6, s

    def cos(a, b):
        return ((a * b).sum() / (a.norm() * b.norm())).item()

    polar = U @ V.T
    assert cos(G, polar) < 0.7
    assert cos(X, polar) > 0.97


def test_newton_schulz_tall_is_transpose_of_wide():
    G = torch.randn(40, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(newton_schulz(G), newton_schulz(G.T).T, rtol=0, atol=1e-5)


def test_newton_schulz_batched_matches_per_matrix_and_dtype_argument():
    G = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(2))
    X = newton_schulz(G)
    for i in range(3):
        torch.testing.assert_close(X[i], newton_schulz(G[i]), rtol=1e-4, atol=1e-5)
    assert newton_schulz(G[0], dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        newton_schulz(torch.ones(5))


# ----------------------------------------------------------------------------- Muon


def _reference_muon(p0, grads, lr, mu, wd):
    """Plain re-statement of the update rule, step by step, for comparison."""
    p, buf = p0.clone(), torch.zeros_like(p0)
    rows, cols = p0.shape
    for g in grads:
        buf = mu * buf + g
        u = newton_schulz(g + mu * buf) * math.sqrt(max(1.0, rows / cols))
        p = p * (1 - lr * wd) - lr * u
    return p


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)])
def test_muon_matches_update_rule(shape):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) for _ in range(3)]
    p = nn.Parameter(p0.clone())
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), _reference_muon(p0, grads, 0.1, 0.9, 0.5),
                               rtol=1e-5, atol=1e-6)


def test_muon_rejects_vectors_and_undistributed_world():
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.ones(4))], lr=0.1, momentum=0.9)
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError):
        Muon([p], lr=0.1, momentum=0.9, rank=0, world_size=2).step()


_SHAPES = [(8, 4), (4, 8), (6, 6), (5, 3), (3, 7)]


def _run_muon(rank: int, world_size: int):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(*s)) for s in _SHAPES]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, rank=rank, world_size=world_size)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)  # the same (already averaged) grads everywhere
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params], len(opt.state)


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        torch.save(_run_muon(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_muon_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single, n_state = _run_muon(0, 1)
    r0, n0 = torch.load(tmp_path / "rank0.pt")
    r1, n1 = torch.load(tmp_path / "rank1.pt")
    assert (n_state, n0, n1) == (5, 3, 2)  # work really was split round-robin
    for a, b, s in zip(r0, r1, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, s, rtol=0, atol=1e-6)
    assert not torch.equal(single[0], torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- build


class _Tiny(LanguageModel):
    def __init__(self, untied: bool):
        super().__init__()
        self.tok_emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)])
        self.attn_scale = nn.Parameter(torch.ones(8))
        self.lm_head = nn.Linear(8, 16, bias=False) if untied else None
        set_roles(self, control=("attn_scale",))
        if untied:
            set_roles(self.lm_head, head=("weight",))


def test_build_optimizers_split_lrs_and_coverage():
    cfg = OptimConfig(matrix_lr=0.02, embed_lr=0.03, head_lr=0.004, scalar_lr=0.01,
                      adam_beta2=0.99, adam_eps=1e-7, muon_wd=0.04, muon_ns_steps=4)
    model = _Tiny(untied=True)
    opts = build_optimizers(model, cfg)
    assert [type(o) for o in opts] == [Muon, torch.optim.Adam, torch.optim.Adam, torch.optim.Adam]
    routes = {o.param_groups[0]["route"]: o.param_groups[0] for o in opts}
    assert {k: g["base_lr"] for k, g in routes.items()} == {
        "matrix": 0.02, "embed": 0.03, "head": 0.004, "scalar": 0.01}
    assert all(g["lr"] == g["base_lr"] for g in routes.values())
    assert routes["matrix"]["weight_decay"] == 0.04 and routes["matrix"]["ns_steps"] == 4
    assert routes["matrix"]["momentum"] == pytest.approx(0.85)  # the warm-up's step-0 value
    assert routes["embed"]["betas"] == (0.9, 0.99) and routes["embed"]["eps"] == 1e-7
    assert routes["scalar"]["weight_decay"] == 0.0
    assert len(routes["matrix"]["params"]) == 2
    assert sum(len(g["params"]) for g in routes.values()) == len(list(model.parameters()))


def test_routing_reads_declared_roles_and_refuses_a_parameter_without_one():
    class Gains(_Tiny):
        def __init__(self):
            super().__init__(untied=False)
            self.w_gain = nn.Parameter(torch.ones(8, 8))  # 2-D, but declared control: Adam, not Muon
            self.g = nn.Parameter(torch.zeros(8))
            set_roles(self, control=("w_gain",), gate=("g",))

    groups = {r: [n for n, _ in ps] for r, ps in Gains().param_groups().items()}
    assert groups == {"embed": ["tok_emb.weight"], "head": [], "matrix": ["blocks.0.weight", "blocks.1.weight"],
                      "scalar": ["attn_scale", "w_gain", "g"]}

    class Undeclared(_Tiny):
        def __init__(self):
            super().__init__(untied=False)
            self.new_gain = nn.Parameter(torch.ones(8, 8))

    with pytest.raises(ValueError, match=r"parameter 'new_gain' \(shape \[8, 8\]\) of Undeclared has no role"):
        build_optimizers(Undeclared(), OptimConfig())
    with pytest.raises(ValueError, match="role matrix but shape"):
        set_roles(Undeclared(), matrix=("attn_scale",)).param_groups()
    with pytest.raises(ValueError, match="no parameter 'atn_scale'"):
        set_roles(_Tiny(untied=False), control=("atn_scale",))


def test_build_optimizers_adamw_tied_and_frozen():
    model = _Tiny(untied=False)
    model.attn_scale.requires_grad_(False)
    opts = build_optimizers(model, OptimConfig(adam_wd=0.04))
    assert [o.param_groups[0]["route"] for o in opts] == ["matrix", "embed"]  # empty groups skipped
    assert isinstance(opts[1], torch.optim.AdamW) and opts[1].param_groups[0]["weight_decay"] == 0.04


def test_build_optimizers_rejects_bad_routing():
    class Dropper(_Tiny):
        def param_groups(self):
            g = super().param_groups()
            g["scalar"] = []
            return g

    class Doubler(_Tiny):
        def param_groups(self):
            g = super().param_groups()
            g["scalar"] = g["scalar"] + g["embed"]
            return g

    with pytest.raises(ValueError, match="in no optimizer.*attn_scale"):
        build_optimizers(Dropper(untied=True), OptimConfig())
    with pytest.raises(ValueError, match="more than one optimizer.*tok_emb"):
        build_optimizers(Doubler(untied=True), OptimConfig())


# ----------------------------------------------------------------------------- schedules


def test_lr_multiplier_by_steps():
    cfg = TrainConfig(max_steps=100, warmdown_steps=10, warmdown_by="steps")
    got = [lr_multiplier(s, cfg, 0.0) for s in (0, 89, 90, 95, 99, 100)]
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.1, 0.0])
    assert lr_multiplier(5, TrainConfig(max_steps=10, warmdown_steps=0), 0.0) == 1.0


def test_lr_multiplier_by_time():
    cfg = TrainConfig(max_wallclock_s=100.0, warmdown_steps=10, warmdown_by="time")
    assert lr_multiplier(0, cfg, 0.0) == 1.0
    assert lr_multiplier(50, cfg, 50.0) == 1.0  # 1 s/step: warm-down = last 10 s
    assert lr_multiplier(90, cfg, 90.0) == pytest.approx(1.0)
    assert lr_multiplier(95, cfg, 95.0) == pytest.approx(0.5)
    assert lr_multiplier(40, cfg, 80.0) == pytest.approx(20 / 20)  # 2 s/step: last 20 s
    assert lr_multiplier(45, cfg, 90.0) == pytest.approx(10 / 20)
    assert lr_multiplier(60, cfg, 120.0) == 0.0
    # No wall-clock cap: falls back to the step rule.
    nocap = TrainConfig(max_steps=100, warmdown_steps=10, warmdown_by="time")
    assert lr_multiplier(95, nocap, 1e9) == pytest.approx(0.5)


def test_muon_momentum_warmup():
    cfg = OptimConfig(muon_momentum=0.99, muon_momentum_warmup_start=0.92,
                      muon_momentum_warmup_steps=1500)
    assert muon_momentum(0, cfg) == pytest.approx(0.92)
    assert muon_momentum(750, cfg) == pytest.approx(0.955)
    assert muon_momentum(1500, cfg) == pytest.approx(0.99)
    assert muon_momentum(10_000, cfg) == pytest.approx(0.99)
    assert muon_momentum(0, OptimConfig(muon_momentum_warmup_steps=0)) == 0.95


def test_apply_schedule_sets_lr_and_muon_momentum_only():
    opts = build_optimizers(_Tiny(untied=True), OptimConfig(matrix_lr=0.04, embed_lr=0.06))
    apply_schedule(opts, 0.25, 0.97)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert opts[0].param_groups[0]["momentum"] == 0.97
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.015)
    assert "momentum" not in opts[1].param_groups[0]
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(KeyError):
        apply_schedule([sgd], 0.5)


# ----------------------------------------------------------------------------- grad transforms


def _param_with_grad(values):
    p = nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values, dtype=torch.float32)
    return p


# (gradient conditioning has its own file: tests/test_grad_conditioning.py)


def test_nan_to_num_():
    p = _param_with_grad([float("nan"), float("inf"), -float("inf"), 3.0])
    nan_to_num_([p])
    big = torch.finfo(torch.float32).max
    assert p.grad.tolist() == [0.0, big, -big, 3.0]


def test_clip_grad_norm_returns_norm_and_clips_only_when_asked():
    a, b = _param_with_grad([3.0]), _param_with_grad([4.0])
    assert clip_grad_norm([a, b], 0.0) == pytest.approx(5.0)
    assert (a.grad.item(), b.grad.item()) == (3.0, 4.0)
    assert clip_grad_norm([a, b], 10.0) == pytest.approx(5.0)
    assert (a.grad.item(), b.grad.item()) == (3.0, 4.0)
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert a.grad.item() == pytest.approx(0.6, rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], 1.0) == 0.0


def test_muon_and_adam_reduce_a_regression_loss():
    torch.manual_seed(0)
    model = _Tiny(untied=True)
    x = torch.randint(0, 16, (64,))
    target = torch.randn(64, 16)

    def loss_fn():
        h = model.tok_emb(x) * model.attn_scale
        for blk in model.blocks:
            h = h + blk(h)
        return ((model.lm_head(h) - target) ** 2).mean()

    opts = build_optimizers(model, OptimConfig(matrix_lr=0.02, embed_lr=0.02, head_lr=0.02))
    first = loss_fn().item()
    for _ in range(30):
        loss = loss_fn()
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    assert loss_fn().item() < 0.7 * first
