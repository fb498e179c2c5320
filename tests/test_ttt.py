"""TTT: score-first ordering (PR #549), adaptation, and detection of train-then-score."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.byte_tables import ByteTables
from eval.scorer import evaluate, score_tokens
from eval.ttt import (check_score_before_update, chunk_lr, pr684_lr, pre_score_full_val_ttt,
                      score_first_ttt)
from eval.windows import sliding_windows
from pipeline.config import EvalConfig, TTTConfig
from pipeline.errors import UserError

V, D = 24, 16
SEQ, STRIDE, CHUNK = 16, 8, 32
N = 1 + 8 * SEQ  # 128 targets -> 4 chunks of 32


class Block(torch.nn.Module):
    """Causal: mixes each position with the one before it (never a later one)."""

    def __init__(self):
        super().__init__()
        self.cur = torch.nn.Linear(D, D)
        self.prev = torch.nn.Linear(D, D)

    def forward(self, x):
        shifted = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return x + torch.tanh(self.cur(x) + self.prev(shifted))


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(D, V)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x).float()


def _model():
    torch.manual_seed(0)
    return TinyLM()


def _tables():
    base = torch.tensor([0] + [1 + i % 2 for i in range(1, V)], dtype=torch.int16)
    space = torch.tensor([False] + [i % 4 == 0 for i in range(1, V)])
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[0] = True
    return ByteTables(base, space, boundary)


def _stream():
    # A repeated random phrase: learnable at test time, so adaptation must lower the loss.
    g = np.random.default_rng(0)
    phrase = g.integers(1, V, size=11)
    toks = np.resize(phrase, N)
    toks[0] = 0
    return toks


EVAL = EvalConfig(seq_len=SEQ, mode="sliding", stride=STRIDE, batch_seqs=3)


def _ttt(**kw):
    base = dict(enabled=True, chunk_tokens=CHUNK, epochs=2, optimizer="sgd", lr=0.1,
                momentum=0.9, batch_seqs=1, grad_clip=1.0)
    base.update(kw)
    return TTTConfig(**base)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model):
    return [not torch.equal(a, b) for a, b in zip(before, model.parameters())]


def test_score_first_ordering_and_last_chunk_untouched():
    model, events = _model(), []
    res = score_first_ttt(model, _stream(), _tables(), EVAL, _ttt(), "cpu", events=events)
    assert check_score_before_update(events) == []
    scores = [e for e in events if e[0] == "score"]
    updates = [e for e in events if e[0] == "update"]
    assert [e[1] for e in scores] == [0, 1, 2, 3]
    # the scored ranges tile the targets 1..N-1 exactly once, in order
    assert scores[0][2] == 1 and scores[-1][3] == N - 1
    assert all(a[3] + 1 == b[2] for a, b in zip(scores, scores[1:]))
    # chunks 0..2 are trained on, never the last; and each only after its own score event
    assert [e[1] for e in updates] == [0, 1, 2]
    for u in updates:
        i = events.index(u)
        done = max(e[3] for e in events[:i] if e[0] == "score")
        assert u[3] <= done
        assert u[2:] == (u[1] * CHUNK, u[1] * CHUNK + CHUNK)  # the chunk's span incl. shift
    assert max(u[3] for u in updates) <= 3 * CHUNK  # nothing of the last chunk's targets
    assert res.token_count == N - 1


def test_last_chunk_tokens_never_reach_the_weights():
    base, late, mid = _stream(), _stream(), _stream()
    # every target of the last chunk (positions 97..128) changes ...
    late[3 * CHUNK + 1:] = (late[3 * CHUNK + 1:] + 5) % (V - 1) + 1
    # ... versus only the last target of chunk 2 (position 96), which is trained on
    mid[3 * CHUNK] = mid[3 * CHUNK] % (V - 1) + 1
    weights = []
    for toks in (base, late, mid):
        model = _model()
        score_first_ttt(model, toks, _tables(), EVAL, _ttt(), "cpu")
        weights.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))


def test_zero_lr_equals_plain_sliding_eval():
    model = _model()
    before = _params(model)
    plain = evaluate(model, _stream(), _tables(), EVAL, "cpu")
    res = score_first_ttt(model, _stream(), _tables(), EVAL, _ttt(lr=0.0, min_lr=0.0), "cpu")
    assert not any(_changed(before, model))
    assert (res.token_count, res.byte_count) == (plain.token_count, plain.byte_count)
    assert res.loss_sum == pytest.approx(plain.loss_sum, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_adaptation_changes_weights_and_lowers_loss(optimizer):
    model = _model()
    before = _params(model)
    plain = evaluate(model, _stream(), _tables(), EVAL, "cpu")
    lr = 0.1 if optimizer == "sgd" else 0.01
    res = score_first_ttt(model, _stream(), _tables(), EVAL, _ttt(optimizer=optimizer, lr=lr),
                          "cpu")
    assert all(_changed(before, model))
    assert (res.token_count, res.byte_count) == (plain.token_count, plain.byte_count)
    # the phrase repeats, so what was learnt on scored chunks helps the later ones
    assert res.loss_sum < plain.loss_sum - 1.0
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_freeze_blocks_keeps_first_block_fixed():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    score_first_ttt(model, _stream(), _tables(), EVAL, _ttt(freeze_blocks=1), "cpu")
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p) == name.startswith("blocks.0."), name
        assert p.requires_grad
    with pytest.raises(UserError, match="freeze_blocks"):
        score_first_ttt(_model(), _stream(), _tables(), EVAL, _ttt(freeze_blocks=3), "cpu")


def _train_then_score(model, tokens, tables, events):
    """The deliberately WRONG order: adapt on each chunk, then score it."""
    tok = torch.as_tensor(tokens.astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wins = sliding_windows(len(tok), SEQ, STRIDE)
    for c in range(4):
        lo = c * CHUNK
        seqs = torch.stack([tok[s:s + SEQ + 1] for s in range(lo, lo + CHUNK, SEQ)])
        loss = F.cross_entropy(model(seqs[:, :-1]).reshape(-1, V), seqs[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        events.append(("update", c, lo, lo + CHUNK))
        mine = [i for i, w in enumerate(wins) if lo < w.first_target <= lo + CHUNK]
        part = wins[mine[0]:mine[-1] + 1]
        score_tokens(model, tok, tables, part, "cpu", 4)
        events.append(("score", c, part[0].first_target, part[-1].last_target))


def test_checker_flags_train_then_score():
    events = []
    _train_then_score(_model(), _stream(), _tables(), events)
    problems = check_score_before_update(events)
    assert len(problems) == 4 and problems[0].startswith("update 0")
    assert "position 1 was not scored" in problems[0]


def test_checker_unit_cases():
    ok = [("score", 0, 1, 10), ("update", 0, 0, 10), ("score", 1, 11, 20), ("update", 1, 10, 20)]
    assert check_score_before_update(ok) == []
    late = [("score", 0, 1, 10), ("update", 0, 0, 11)]
    assert check_score_before_update(late) == ["update 0: trains on positions 0..11, but "
                                                "position 11 was not scored before it"]
    rescore = [("score", 0, 1, 10), ("score", 1, 10, 20)]
    assert "already scored" in check_score_before_update(rescore)[0]
    with pytest.raises(ValueError):
        check_score_before_update([("peek", 0, 1, 2)])


def test_pre_score_full_val_is_flagged_and_memorises():
    model, events = _model(), []
    plain = evaluate(model, _stream(), _tables(), EVAL, "cpu")
    cfg = _ttt(mode="pre_score_full_val", optimizer="adamw", lr=0.01, min_lr=0.001, epochs=3,
               warmup_epochs=1, batch_seqs=4, weight_decay=0.01)
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="NOT compliant"):
        res = pre_score_full_val_ttt(model, _stream(), _tables(), EVAL, cfg, "cpu",
                                     events=events)
    assert [e[0] for e in events] == ["update"] * 3 + ["score"]
    problems = check_score_before_update(events)
    assert len(problems) == 3 and all("not scored" in p for p in problems)
    assert all(_changed(before, model))
    assert res.token_count == plain.token_count and res.byte_count == plain.byte_count
    assert res.loss_sum < plain.loss_sum - 1.0


def test_lr_schedules():
    assert chunk_lr(0, 5, 0.002, 0.0) == 0.002
    assert chunk_lr(4, 5, 0.002, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert chunk_lr(2, 5, 0.004, 0.002) == pytest.approx(0.003)
    # PR #684: 119 steps per epoch, 20 epochs, 1 warm-up epoch, 5e-4 -> 2e-5
    args = dict(steps_per_epoch=119, epochs=20, warmup_epochs=1, lr=5e-4, min_lr=2e-5)
    assert pr684_lr(0, **args) == pytest.approx(5e-5)  # floor of 0.1
    assert pr684_lr(60, **args) == pytest.approx(5e-4 * 60 / 119)
    assert pr684_lr(119, **args) == pytest.approx(5e-4)  # warm-up over, cosine starts at 1
    mid = 119 + (2380 - 119) // 2
    assert pr684_lr(mid, **args) == pytest.approx(2e-5 + (5e-4 - 2e-5) * 0.5 * (
        1 + math.cos(math.pi * ((mid - 119) / (2380 - 119)))))
    assert pr684_lr(2380, **args) == pytest.approx(2e-5)


def test_user_errors():
    with pytest.raises(UserError, match="chunk_tokens"):
        score_first_ttt(_model(), _stream(), _tables(), EVAL, _ttt(chunk_tokens=8), "cpu")
    pr298 = EvalConfig(seq_len=SEQ, mode="pr298_all_positions", stride=STRIDE)
    with pytest.raises(UserError, match="pr298"):
        score_first_ttt(_model(), _stream(), _tables(), pr298, _ttt(), "cpu")
    with pytest.raises(UserError, match="torch.distributed"):
        score_first_ttt(_model(), _stream(), _tables(), EVAL, _ttt(), "cpu", rank=0,
                        world_size=2)
    with pytest.raises(UserError, match="optimizer"):
        score_first_ttt(_model(), _stream(), _tables(), EVAL, _ttt(optimizer="lion"), "cpu")



@pytest.mark.parametrize("mode", ["sliding", "nonoverlap"])
def test_both_drivers_count_the_byte_sidecar(mode):
    """With a sidecar (pg_mechanics.md §2.7) every scored target counts its sidecar entry, in
    the score-first driver and the flagged PR #684 one alike; the stream carries a tail that
    eval truncation drops, so the sidecar must be truncated by position with it."""
    toks = np.concatenate([_stream(), [3, 4, 5]])
    counts = np.random.default_rng(1).integers(0, 6, size=len(toks)).astype(np.uint16)
    counts[0] = 0
    tables = _tables().with_token_bytes(counts)
    cfg = EvalConfig(seq_len=SEQ, mode=mode, stride=STRIDE, batch_seqs=3)
    expected = int(counts[1:N].sum())  # the N - 1 targets of the truncated stream
    plain = score_first_ttt(_model(), toks, _tables(), cfg, _ttt(), "cpu")
    assert plain.byte_count != expected
    res = score_first_ttt(_model(), toks, tables, cfg, _ttt(), "cpu")
    assert (res.token_count, res.byte_count) == (N - 1, expected)
    assert res.loss_sum == pytest.approx(plain.loss_sum, rel=1e-9)
    pre = _ttt(mode="pre_score_full_val", epochs=1, batch_seqs=4)
    with pytest.warns(RuntimeWarning):
        res = pre_score_full_val_ttt(_model(), toks, tables, cfg, pre, "cpu")
    assert (res.token_count, res.byte_count) == (N - 1, expected)
    with pytest.raises(UserError, match="sidecar"):
        score_first_ttt(_model(), toks, _tables().with_token_bytes(counts[:-1]), cfg, _ttt(), "cpu")
