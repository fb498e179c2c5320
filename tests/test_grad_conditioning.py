"""Gradient conditioning g_p <- s_p*g_p + b_p (seed_components.md §2.2): the identity default is
a bitwise no-op, per-tensor rules (first match wins), bad patterns, hypergradient-learned
scalars against hand-computed values, and bitwise resume of a run that learns them.

    .venv/bin/python -m pytest -q tests/test_grad_conditioning.py
"""

from __future__ import annotations

import copy
from dataclasses import replace
import io

import pytest
import torch
from torch import nn

from conftest import interrupt_at, make_trainer, tiny_recipe
from pipeline.config import GradConditioningConfig as Cfg
from pipeline.config import GradConditioningRule as Rule
from pipeline.data.shards import list_shards
from pipeline.distributed import init
from pipeline.errors import UserError
from pipeline.optim import GradConditioningState, condition_gradients
from pipeline.stages.train import CHECKPOINT, Trainer

HYPER = ("optim.grad_conditioning.mode=hypergradient", "optim.grad_conditioning.hyper_lr_scale=0.5",
         "optim.grad_conditioning.hyper_lr_bias=0.001")


def _named(**grads):
    """{name: parameter} with the given gradients (None = no grad)."""
    out = {}
    for name, values in grads.items():
        p = nn.Parameter(torch.zeros(torch.tensor(values).shape if values is not None else 2))
        p.grad = None if values is None else torch.tensor(values, dtype=torch.float32)
        out[name] = p
    return out


def _bits(t):
    return t.view(torch.int32).clone()


# ----------------------------------------------------------------------------- fixed


def test_identity_is_bitwise_noop_and_leaves_state_alone():
    params = _named(w=[-0.0, float("nan"), 1.5, -2.0])
    g = params["w"].grad
    before, ptr = _bits(g), g.data_ptr()
    state = GradConditioningState()
    # identity rules (an "exclude" rule) keep it the identity too
    for cfg in (Cfg(), Cfg(rules=(Rule(pattern="w"),))):
        condition_gradients(params.items(), cfg, state)
        # -0.0 + 0.0 would give +0.0, so comparing bits catches any arithmetic at all.
        assert torch.equal(_bits(params["w"].grad), before) and params["w"].grad.data_ptr() == ptr
    assert state.state_dict() == {"scale": {}, "bias": {}, "prev": {}}


def test_global_affine_skips_params_without_grad():
    params = _named(p=[1.0, -2.0], q=None)
    condition_gradients(params.items(), Cfg(scale=2.0, bias=0.5))
    assert params["p"].grad.tolist() == [2.5, -3.5] and params["q"].grad is None


def test_rules_first_match_wins_unmatched_use_global():
    gen = torch.Generator().manual_seed(0)
    names = ["blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight", "blocks.0.attn_scale"]
    raw = {n: torch.randn(3, 5, generator=gen) for n in names}
    params = {n: nn.Parameter(torch.zeros(3, 5)) for n in names}
    for n, p in params.items():
        p.grad = raw[n].clone()
    cfg = Cfg(scale=0.5, bias=-0.25, rules=(
        Rule(pattern=r"attn\.c_q", scale=3.0, bias=0.125),
        Rule(pattern=r"attn", scale=7.0, bias=1.0),     # c_q matched above first: not this one
        Rule(pattern=r"^tok_emb", scale=1.0, bias=0.0),  # identity: untouched, bitwise
    ))
    condition_gradients(params.items(), cfg)
    expected = {names[0]: (3.0, 0.125), names[1]: (0.5, -0.25), names[3]: (7.0, 1.0)}
    for n, (s, b) in expected.items():
        assert torch.equal(params[n].grad, raw[n] * s + b), n
    assert torch.equal(_bits(params["tok_emb.weight"].grad), _bits(raw["tok_emb.weight"]))


def test_bad_pattern_is_a_user_error_naming_pattern_and_path(small_data, tmp_path):
    # load_recipe rejects the pattern already (tests/test_recipe.py); a Recipe built in code must
    # still be stopped by the trainer before its first step.
    recipe = tiny_recipe()
    bad = (Rule(pattern="attn", scale=2.0), Rule(pattern="mlp(", bias=0.1))
    recipe = replace(recipe, optim=replace(recipe.optim, grad_conditioning=replace(
        recipe.optim.grad_conditioning, rules=bad)))
    with pytest.raises(UserError) as e:
        Trainer(recipe, list_shards(small_data, "train"), tmp_path, init("cpu"), log=lambda s: None)
    msg = str(e.value)
    assert "optim.grad_conditioning.rules[1].pattern" in msg and "'mlp('" in msg
    assert not (tmp_path / CHECKPOINT).exists()


# ----------------------------------------------------------------------------- hypergradient


def test_hypergradient_two_steps_match_hand_computed_values():
    # Values are exact in fp32, so every comparison is exact.
    cfg = Cfg(mode="hypergradient", scale=1.0, bias=0.0, hyper_lr_scale=0.25, hyper_lr_bias=0.5,
              rules=(Rule(pattern="^v$", scale=2.0, bias=-1.0),))
    state = GradConditioningState()
    g1 = {"w": [[1.0, 2.0], [3.0, 4.0]], "v": [1.0, -1.0, 2.0]}
    g2 = {"w": [[0.5, -1.0], [2.0, 0.0]], "v": [4.0, 0.5, -0.5]}

    params = _named(**g1)
    condition_gradients(params.items(), cfg, state)
    # step 1: no previous gradient, so s, b are the initial (global / rule) values
    assert params["w"].grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert params["v"].grad.tolist() == [1.0, -3.0, 3.0]  # 2 g - 1
    assert torch.equal(state.prev["v"], torch.tensor(g1["v"]))  # the RAW gradient is kept

    params = _named(**g2)
    condition_gradients(params.items(), cfg, state)
    # w: <g2, g1> = 0.5 - 2 + 6 + 0 = 4.5 -> s = 1 + 0.25*4.5 = 2.125; sum g2 = 1.5 -> b = 0.75
    # v: <g2, g1> = 4 - 0.5 - 1 = 2.5 -> s = 2 + 0.625 = 2.625; sum g2 = 4 -> b = -1 + 2 = 1
    assert (state.scale["w"].item(), state.bias["w"].item()) == (2.125, 0.75)
    assert (state.scale["v"].item(), state.bias["v"].item()) == (2.625, 1.0)
    assert params["w"].grad.tolist() == [[0.5 * 2.125 + 0.75, -2.125 + 0.75], [2 * 2.125 + 0.75, 0.75]]
    assert params["v"].grad.tolist() == [4 * 2.625 + 1.0, 0.5 * 2.625 + 1.0, -0.5 * 2.625 + 1.0]
    assert torch.equal(state.prev["w"], torch.tensor(g2["w"]))


def test_hypergradient_needs_a_state():
    with pytest.raises(ValueError, match="GradConditioningState"):
        condition_gradients(_named(w=[1.0]).items(), Cfg(mode="hypergradient"))


def test_state_dict_round_trip_restores_exactly():
    cfg = Cfg(mode="hypergradient", hyper_lr_scale=0.1, hyper_lr_bias=0.01)
    gen = torch.Generator().manual_seed(1)
    state = GradConditioningState()
    for _ in range(3):
        params = {"a": nn.Parameter(torch.zeros(4, 3)), "b": nn.Parameter(torch.zeros(5))}
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        condition_gradients(params.items(), cfg, state)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    restored = GradConditioningState()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    # the same next step from both gives bitwise the same gradients and state
    g = {n: torch.randn(s, generator=gen) for n, s in (("a", (4, 3)), ("b", (5,)))}
    outs = []
    for st in (state, restored):
        params = {n: nn.Parameter(torch.zeros(v.shape)) for n, v in g.items()}
        for n, p in params.items():
            p.grad = g[n].clone()
        condition_gradients(params.items(), cfg, st)
        outs.append(({n: p.grad for n, p in params.items()}, st.state_dict()))
    (ga, sa), (gb, sb) = outs
    assert all(torch.equal(ga[n], gb[n]) for n in g)
    for k in ("scale", "bias", "prev"):
        assert sa[k].keys() == sb[k].keys() == {"a", "b"}
        assert all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k])
    assert sa["scale"]["a"].item() != 1.0 and sa["bias"]["b"].item() != 0.0  # it did learn something


# ----------------------------------------------------------------------------- in training


def _interrupted_then_resumed(recipe, data, out):
    first = make_trainer(recipe, data, out, progress=interrupt_at(6))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 6
    second = make_trainer(recipe, data, out)
    assert second.run().resumed_from == 6
    return second


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_hypergradient_run_resumes_bitwise(small_data, tmp_path, one_thread):
    recipe = tiny_recipe(*HYPER)
    full = make_trainer(recipe, small_data, tmp_path / "full")
    full.run()
    scales = torch.stack(list(full.grad_state.scale.values()))
    # The scalars moved, so the resume below has state to carry. Not every one: on a tensor
    # whose <g_t, g_{t-1}> is tiny the fp32 increment to s = 1 can round away entirely.
    assert (scales != 1.0).sum() >= len(scales) // 2

    resumed = _interrupted_then_resumed(recipe, small_data, tmp_path / "resumed")
    assert _same_weights(full, resumed)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    for k, v in full.grad_state.state_dict().items():
        assert all(torch.equal(t, resumed.grad_state.state_dict()[k][n]) for n, t in v.items()), k


def test_resume_without_restoring_the_state_diverges(small_data, tmp_path, one_thread, monkeypatch):
    # The control for the test above: dropping the conditioning state on resume must show.
    recipe = tiny_recipe(*HYPER)
    full = make_trainer(recipe, small_data, tmp_path / "full")
    full.run()
    monkeypatch.setattr(GradConditioningState, "load_state_dict", lambda self, state: None)
    resumed = _interrupted_then_resumed(recipe, small_data, tmp_path / "resumed")
    assert not _same_weights(full, resumed)


def test_priming_leaves_no_trace_in_the_state(small_data, tmp_path, one_thread):
    plain = make_trainer(tiny_recipe("train.max_steps=5", *HYPER), small_data, tmp_path / "plain")
    plain.run()
    primed = make_trainer(tiny_recipe("train.max_steps=5", "train.prime_steps=3", *HYPER), small_data,
                      tmp_path / "primed")
    primed.run()
    assert _same_weights(plain, primed)
    a, b = plain.grad_state.state_dict(), copy.deepcopy(primed.grad_state.state_dict())
    assert all(torch.equal(a["scale"][n], b["scale"][n]) for n in a["scale"])
