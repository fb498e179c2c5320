"""The causality audit catches each kind of violation, names the part, and passes every recipe.

Each toy violation is spliced into a tiny 2-layer unet_gpt in front of one real part, so the
expected culprit is a known qualified name (e.g. `blocks.1.attn.leak`).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from pipeline.audit import (AuditReport, audit_model, audit_recipe, check_target_alignment, format_failure,
                            randomize_zero_params, shrink_model_config)
from pipeline.config import ModelConfig, Recipe
from pipeline.model.compose import model_config
from pipeline.model.parts.embeddings import BigramConfig
from pipeline.model.parts.rotary import RopeConfig
from pipeline.model.parts.sidecar import SidecarConfig
from pipeline.model.registry import build_model
from pipeline.recipe import RECIPES_DIR, load_recipe

TINY = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
HAS_RECURRENT = importlib.util.find_spec("pipeline.model.recurrent") is not None


class Spliced(nn.Module):
    """Runs `leak` on the input of the wrapped part."""

    def __init__(self, leak: nn.Module, inner: nn.Module):
        super().__init__()
        self.leak, self.inner = leak, inner

    def forward(self, x):
        return self.inner(self.leak(x))


class SequenceMean(nn.Module):  # every position sees the mean of the whole window
    def forward(self, x):
        return x + x.mean(dim=1, keepdim=True)


class BatchMean(nn.Module):  # BatchNorm-like: statistics across the rows of the batch
    def forward(self, x):
        return x - 0.5 * x.mean(dim=0, keepdim=True)


class RunningMemory(nn.Module):  # an EMA buffer updated in forward, even in eval mode
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mem", torch.zeros(dim))

    def forward(self, x):
        out = x + self.mem
        self.mem.mul_(0.5).add_(0.5 * x.mean(dim=(0, 1)))
        return out


class LengthPosition(nn.Module):  # ELiTA-style linspace(0, 1, T): uses T in per-position maths
    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        t = torch.linspace(0, 1, x.size(1), dtype=x.dtype)
        return x + t[:, None] * self.w


def tiny(site: str | None = None, leak: nn.Module | None = None, cfg: ModelConfig = TINY) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_zero_params(model, seed=0)
    if leak is not None:
        block, part = site.split(".")
        setattr(model.blocks[int(block)], part, Spliced(leak, getattr(model.blocks[int(block)], part)))
    return model.eval()


def by_test(results):
    return {r.test: r for r in results}


def test_clean_model_passes_exactly():
    results = audit_model(tiny(), TINY.vocab_size)
    assert [r.test for r in results] == ["future_perturbation@1", "future_perturbation@16", "future_perturbation@31",
                                         "jacobian", "prefix_consistency", "statelessness", "batch_independence"]
    assert all(r.passed and r.culprit is None for r in results)
    # Causal parts give bit-identical logits, not merely close ones.
    assert all(r.max_dev == 0.0 for r in results)


def test_sequence_mean_is_caught_and_named():
    r = by_test(audit_model(tiny("1.attn", SequenceMean()), TINY.vocab_size))
    for k in (1, 16, 31):
        fp = r[f"future_perturbation@{k}"]
        assert not fp.passed and fp.max_dev > 1e-3
        assert fp.culprit == "blocks.1.attn.leak" and 0 <= fp.position < k
    assert not r["jacobian"].passed and r["jacobian"].culprit == "blocks.1.attn.leak"
    assert r["statelessness"].passed and r["batch_independence"].passed


def test_batch_mean_is_caught_only_by_batch_independence():
    r = by_test(audit_model(tiny("0.mlp", BatchMean()), TINY.vocab_size))
    assert not r["batch_independence"].passed and r["batch_independence"].culprit == "blocks.0.mlp.leak"
    assert [t for t, x in r.items() if not x.passed] == ["batch_independence"]


def test_stateful_buffer_is_caught_only_by_statelessness():
    model = tiny("0.attn", RunningMemory(TINY.model_dim))
    r = by_test(audit_model(model, TINY.vocab_size))
    s = r["statelessness"]
    assert not s.passed and s.culprit == "blocks.0.attn.leak"
    assert "blocks.0.attn.leak.mem" in s.detail
    # Every other test runs each forward on a fresh copy, so the state does not leak into them.
    assert [t for t, x in r.items() if not x.passed] == ["statelessness"]
    assert torch.equal(model.blocks[0].attn.leak.mem, torch.zeros(TINY.model_dim))  # caller's model untouched


def test_length_normalised_position_fails_prefix_but_not_future():
    r = by_test(audit_model(tiny("1.mlp", LengthPosition(TINY.model_dim)), TINY.vocab_size))
    p = r["prefix_consistency"]
    assert not p.passed and p.culprit == "blocks.1.mlp.leak" and p.max_dev > 1e-3
    assert all(r[f"future_perturbation@{k}"].passed for k in (1, 16, 31))
    assert r["jacobian"].passed


def test_ntk_rescaled_rope_depends_on_window_length():
    # The NTK base rescale switches on when T > ntk_train_seq_len: a real part that uses T.
    cfg = model_config(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                       rope=RopeConfig(dims=4, ntk_train_seq_len=16))
    r = by_test(audit_model(tiny(cfg=cfg), cfg.vocab_size))
    assert not r["prefix_consistency"].passed
    assert r["prefix_consistency"].culprit == "blocks.0.attn.rotary"
    assert all(r[f"future_perturbation@{k}"].passed for k in (1, 16, 31))


class Pool(nn.Module):  # a [B, D] summary: no position axis for the tracer to compare
    def forward(self, x):
        return x.mean(dim=1)


class ToyLM(nn.Module):
    """Broadcasts a whole-window mean to every position, in a module or in its own code."""

    def __init__(self, in_module: bool):
        super().__init__()
        self.tok_emb, self.pool, self.head = nn.Embedding(16, 8), Pool(), nn.Linear(8, 16)
        self.in_module = in_module

    def forward(self, ids):
        x = self.tok_emb(ids)
        s = self.pool(x) if self.in_module else x.mean(dim=1)
        return self.head(x + s[:, None])


@pytest.mark.parametrize("in_module, culprit", [(True, "pool"), (False, "ToyLM")])
def test_culprit_for_position_less_outputs_and_inline_code(in_module, culprit):
    torch.manual_seed(0)
    r = by_test(audit_model(ToyLM(in_module), vocab_size=16, seq_len=8))
    assert r["future_perturbation@4"].culprit == culprit
    assert r["jacobian"].culprit == culprit and r["jacobian"].position in (0, 3, 6)


def test_audit_leaves_the_model_untouched():
    model = tiny("1.attn", SequenceMean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit_model(model, TINY.vocab_size)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_lines_and_failure_message():
    results = audit_model(tiny("1.attn", SequenceMean()), TINY.vocab_size)
    report = AuditReport("toy", results, model_causal_flag=True)
    lines = report.lines()
    assert not report.passed and len(lines) == 7
    assert lines[1].startswith("future_perturbation@16 FAIL max_dev=")
    assert "culprit=blocks.1.attn.leak position=" in lines[1]
    assert lines[5] == "statelessness PASS max_dev=0.000e+00"
    msg = format_failure(report)
    assert "future_perturbation@16" in msg and "`blocks.1.attn.leak`" in msg and "at position" in msg
    assert "unflagged" in msg
    assert format_failure(AuditReport("ok", [r for r in results if r.passed], True)) == ""


def test_shrink_keeps_every_part_on():
    cfg = model_config(vocab_size=1024, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
                       smear_gate=True, kv_shift_mix=True, bigram=BigramConfig(2048, 128),
                       sidecar=SidecarConfig(48, (8, 9, 10)), rope=RopeConfig(dims=16, ntk_train_seq_len=1024))
    s = shrink_model_config(cfg)
    assert (s.model_dim, s.num_heads, s.num_kv_heads, s.vocab_size, s.num_layers) == (64, 4, 2, 256, 11)
    assert (s.bigram.buckets, s.bigram.dim) == (64, 16)
    assert (s.sidecar.hidden, s.sidecar.layers) == (8, (8, 9, 10))
    assert s.rope.dims == 4  # 16 of 64 rotated stays partial: 4 of 16
    assert s.smear_gate and s.kv_shift_mix and s.mlp_mult == 3.0
    mha = shrink_model_config(ModelConfig(vocab_size=100, num_heads=8, num_kv_heads=8))
    assert (mha.num_kv_heads, mha.vocab_size, mha.rope.dims, mha.bigram) == (4, 100, 0, None)
    from pipeline.model.recurrent import RecurrentConfig

    rec = shrink_model_config(model_config(trunk="depth_recurrent", recurrent=RecurrentConfig(k_rank=32, td_rank=4)))
    assert (rec.recurrent.k_rank, rec.recurrent.td_rank, rec.recurrent.gru_rank) == (8, 4, 8)
    assert (rec.recurrent.unique_layers, rec.recurrent.passes) == (3, 3)


def test_randomize_zero_params_wakes_dormant_paths_only():
    torch.manual_seed(0)
    model = build_model(TINY)
    c_q = model.blocks[0].attn.c_q.weight.clone()
    changed = randomize_zero_params(model, seed=3)
    attn = model.blocks[0].attn
    assert "blocks.0.attn.proj.weight" in changed and "blocks.0.mlp.proj.weight" in changed
    assert "blocks.0.resid_mix" in changed and "blocks.0.attn.q_gain" in changed
    assert "blocks.0.attn.c_q.weight" not in changed and torch.equal(attn.c_q.weight, c_q)
    assert (attn.proj.weight != 0).all() and (model.blocks[0].resid_mix[1] != 0).all()
    assert attn.q_gain.std() > 0.01  # no longer one repeated value
    torch.manual_seed(0)
    again = build_model(TINY)
    randomize_zero_params(again, seed=3)
    assert torch.equal(again.blocks[0].attn.proj.weight, attn.proj.weight)


def test_check_target_alignment():
    stream = torch.arange(40).reshape(2, 20)
    x, y = stream[:, :-1], stream[:, 1:]
    check_target_alignment(x, y)
    check_target_alignment(x[0], y[0])
    bad = y.clone()
    bad[1, 3] += 1
    with pytest.raises(AssertionError, match="row 1, t=3"):
        check_target_alignment(x, bad)
    with pytest.raises(AssertionError, match="shifted by one"):
        check_target_alignment(x, x)  # targets equal to inputs: the off-by-one leak


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_passes(path):
    report = audit_recipe(load_recipe(path))
    assert report.passed, format_failure(report)
    assert report.model_causal_flag
    assert report.config.model_dim == 64 and all(" PASS " in line for line in report.lines())


@pytest.mark.skipif(not HAS_RECURRENT, reason="the depth_recurrent trunk is not in this checkout")
def test_pr298_selective_state_leak_is_named():
    if (RECIPES_DIR / "depth_recurrent.yaml").exists():
        recipe = load_recipe("depth_recurrent", overrides=["model.leaky_selective_state=true"])
    else:
        recipe = Recipe(name="depth_recurrent", model=model_config(
            trunk="depth_recurrent", model_dim=64, num_heads=4, num_kv_heads=2, leaky_selective_state=True))
    report = audit_recipe(recipe)
    r = by_test(report.results)
    assert not report.passed and not report.model_causal_flag
    for k in (1, 16, 31):
        assert r[f"future_perturbation@{k}"].culprit == "selective_state"
        assert r[f"future_perturbation@{k}"].max_dev > 1e-3
    assert r["statelessness"].passed and r["batch_independence"].passed
    msg = format_failure(report)
    assert "`selective_state`" in msg and "causal=False" in msg


@pytest.mark.skipif(not HAS_RECURRENT, reason="the depth_recurrent trunk is not in this checkout")
def test_pr298_causal_selective_state_passes():
    recipe = Recipe(name="dr", model=ModelConfig(trunk="depth_recurrent", model_dim=64, num_heads=4, num_kv_heads=2))
    report = audit_recipe(recipe)
    assert report.passed, format_failure(report)
