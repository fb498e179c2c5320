"""The scorer: exact nats / tokens / bytes sums, window modes, rank splits, one all-reduce."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eval.byte_tables import ByteTables
from eval.scorer import EvalResult, evaluate, score_tokens
from eval.windows import Windows, pr298_windows, sliding_windows
from pipeline.config import EvalConfig
from pipeline.errors import UserError

V = 16
BOS = 0


def _tables():
    # Hand-made tables: id 0 is BOS (boundary, 0 bytes); ids 1..15 have 1..3 bytes and every
    # third one carries a leading space.
    base = torch.tensor([0] + [1 + (i % 3) for i in range(1, V)], dtype=torch.int16)
    space = torch.tensor([False] + [i % 3 == 0 for i in range(1, V)])
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[0] = True
    return ByteTables(base, space, boundary)


def _stream(n, seed=0):
    g = np.random.default_rng(seed)
    toks = g.integers(1, V, size=n)
    toks[0] = BOS
    toks[g.integers(1, n, size=max(1, n // 20))] = BOS  # documents inside the stream
    return toks.astype(np.uint16)  # shards store uint16


class KGram(torch.nn.Module):
    """Strictly causal: logits at t = sum_j W_j[ids[t-j]] for j < k that lie in the window."""

    def __init__(self, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.w = torch.nn.Parameter(torch.randn(k, V, V, generator=g))

    def forward(self, ids):
        out = torch.zeros(*ids.shape, V)
        for j in range(self.k):
            out[:, j:] += self.w[j][ids[:, :ids.shape[1] - j]]
        return out


class PrefixMean(torch.nn.Module):
    """Strictly causal and depends on the whole window prefix (running mean of one-hots)."""

    def __init__(self, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(V, V, generator=g))
        self.u = torch.nn.Parameter(3 * torch.randn(V, V, generator=g))

    def forward(self, ids):
        onehot = torch.nn.functional.one_hot(ids, V).float()
        mean = onehot.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.w[ids] + mean @ self.u


def _full_context_nll(model, toks):
    """Reference: one forward over the whole stream, every target scored."""
    ids = torch.as_tensor(toks.astype(np.int64))
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    return float(torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="sum"))


def _cfg(mode, seq_len=16, stride=4, batch_seqs=3):
    return EvalConfig(seq_len=seq_len, mode=mode, stride=stride, batch_seqs=batch_seqs)


def test_eval_result_properties():
    r = EvalResult(loss_sum=10.0, token_count=4, byte_count=8, top1_correct=1)
    assert r.val_loss == 2.5
    assert r.val_bpb == pytest.approx(10.0 / (8 * math.log(2)))
    assert r.top1_accuracy == 0.25
    s = r + EvalResult(2.0, 1, 2, 1)
    assert (s.loss_sum, s.token_count, s.byte_count, s.top1_correct) == (12.0, 5, 10, 2)


def test_uniform_logits_give_ln_v_and_exact_bytes():
    toks = _stream(1 + 5 * 16 + 7)  # 7 tail tokens are dropped by truncation
    tables = _tables()
    res = evaluate(lambda ids: torch.zeros(*ids.shape, V), toks, tables, _cfg("sliding"), "cpu")
    kept = toks[:1 + 5 * 16]
    assert res.token_count == 5 * 16
    assert res.byte_count == tables.count_bytes(kept)
    assert res.val_loss == pytest.approx(math.log(V), rel=1e-7)
    assert res.val_bpb == pytest.approx(
        math.log(V) * res.token_count / (res.byte_count * math.log(2)), rel=1e-7)
    # argmax of uniform logits is id 0, so top-1 hits are exactly the BOS targets
    assert res.top1_correct == int((kept[1:] == 0).sum())


@pytest.mark.parametrize("mode", ["sliding", "nonoverlap"])
def test_every_target_scored_once(mode):
    toks = _stream(1 + 3 * 16 + 5)
    res = evaluate(KGram(1), toks, _tables(), _cfg(mode), "cpu")
    assert res.token_count == 3 * 16  # N - 1 after truncation to 49 tokens


def test_nonoverlap_equals_sliding_with_stride_seq_len():
    toks = _stream(1 + 6 * 16)
    model, tables = PrefixMean(), _tables()
    a = evaluate(model, toks, tables, _cfg("nonoverlap"), "cpu")
    b = evaluate(model, toks, tables, _cfg("sliding", stride=16), "cpu")
    assert (a.token_count, a.byte_count) == (b.token_count, b.byte_count)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-12)
    c = evaluate(model, toks, tables, _cfg("sliding", stride=4), "cpu")
    assert c.byte_count == a.byte_count
    assert abs(c.loss_sum - a.loss_sum) > 1e-3  # more context really changes the score


def test_one_window_equals_full_context():
    toks = _stream(1 + 32)
    model = PrefixMean()
    ref = _full_context_nll(model, toks)
    for stride in (1, 5, 32):  # seq_len = N - 1: the first window already sees everything
        res = evaluate(model, toks, _tables(), _cfg("sliding", seq_len=32, stride=stride), "cpu")
        assert res.token_count == 32
        assert res.loss_sum == pytest.approx(ref, rel=1e-6)


def test_sliding_context_guarantee_matches_full_context_for_kgram():
    toks = _stream(1 + 8 * 16)
    model = KGram(3)  # sees the current and 2 previous tokens
    ref = _full_context_nll(model, toks)
    for stride in (1, 4, 14):  # seq_len - stride >= 2 = the model's reach
        res = evaluate(model, toks, _tables(), _cfg("sliding", stride=stride), "cpu")
        assert res.loss_sum == pytest.approx(ref, rel=1e-6)
    # non-overlapping windows cut the context at each window start, so they differ
    res = evaluate(model, toks, _tables(), _cfg("nonoverlap"), "cpu")
    assert abs(res.loss_sum - ref) > 1e-3


def test_padding_is_never_scored():
    toks = _stream(1 + 3 * 16, seed=3)
    toks[toks == 0] = 5  # no BOS at all, so id 0 only ever appears as padding
    ids_seen = []

    def poisoned(ids):  # NaN wherever the padding id 0 is fed
        ids_seen.append(ids.clone())
        out = KGram(1)(ids)
        return torch.where((ids == 0)[..., None], torch.nan, out)

    tables = _tables()
    wins = sliding_windows(len(toks), 16, 12)  # 48 targets: the last window is short
    assert wins.lengths[-1] < 16
    res = score_tokens(poisoned, toks, tables, wins, "cpu", batch_seqs=8)
    assert any(bool((i == 0).any()) for i in ids_seen)  # padding was fed ...
    assert math.isfinite(res.loss_sum)  # ... but never scored
    assert res.loss_sum == pytest.approx(_full_context_nll(KGram(1), toks), rel=1e-6)


def test_pr298_mode_counts_every_position_of_every_window():
    toks = _stream(1 + 4 * 16)
    tables = _tables()
    res = evaluate(lambda ids: torch.zeros(*ids.shape, V), toks, tables,
                   _cfg("pr298_all_positions", stride=4), "cpu")
    # starts 0, 4, ..., 48 (start + 16 < 65): 13 full windows, all 16 positions scored
    assert res.token_count == 13 * 16 == 208
    expected_bytes = sum(tables.count_bytes(toks[s:s + 17]) for s in range(0, 49, 4))
    assert res.byte_count == expected_bytes
    assert res.loss_sum == pytest.approx(208 * math.log(V), rel=1e-7)
    two = pr298_windows(len(toks), 16, 4, world_size=2)
    parts = [evaluate(lambda ids: torch.zeros(*ids.shape, V), toks, tables,
                      _cfg("pr298_all_positions", stride=4), "cpu", rank=r, world_size=2)
             for r in range(2)]
    assert parts[0].token_count + parts[1].token_count == len(two) * 16 == 10 * 16


def test_rank_shares_add_up_to_single_process():
    toks = _stream(1 + 10 * 16)
    model, tables, cfg = PrefixMean(), _tables(), _cfg("sliding", batch_seqs=2)
    whole = evaluate(model, toks, tables, cfg, "cpu")
    parts = [evaluate(model, toks, tables, cfg, "cpu", rank=r, world_size=3) for r in range(3)]
    total = parts[0] + parts[1] + parts[2]
    assert (total.token_count, total.byte_count) == (whole.token_count, whole.byte_count)
    assert total.top1_correct == whole.top1_correct
    assert total.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)


def test_single_all_reduce_when_distributed(tmp_path, monkeypatch):
    toks = _stream(1 + 4 * 16)
    model, tables, cfg = KGram(2), _tables(), _cfg("sliding")
    plain = evaluate(model, toks, tables, cfg, "cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.dtype),
                                                                real(t, *a, **k))[1])
    try:
        res = evaluate(model, toks, tables, cfg, "cpu")
    finally:
        dist.destroy_process_group()
    assert calls == [torch.float64]
    assert res == plain


def test_progress_and_model_mode_restored():
    toks = _stream(1 + 4 * 16)
    model = KGram(1).train()
    seen = []
    evaluate(model, toks, _tables(), _cfg("sliding", batch_seqs=4), "cpu",
             progress=lambda d, t: seen.append((d, t)))
    n = len(sliding_windows(len(toks), 16, 4))
    assert seen[-1] == (n, n) and len(seen) == math.ceil(n / 4)
    assert model.training


def test_user_errors():
    tables = _tables()
    zero = lambda ids: torch.zeros(*ids.shape, V)  # noqa: E731
    with pytest.raises(UserError, match="fewer than"):
        evaluate(zero, _stream(10), tables, _cfg("sliding"), "cpu")
    bad = _stream(1 + 16)
    bad[3] = V  # outside the tables
    with pytest.raises(UserError, match="different tokenizer"):
        evaluate(zero, bad, tables, _cfg("sliding"), "cpu")
    with pytest.raises(UserError, match="logits"):
        evaluate(lambda ids: torch.zeros(ids.shape[0], V), _stream(17), tables,
                 _cfg("sliding"), "cpu")
    with pytest.raises(UserError, match="batch_seqs"):
        score_tokens(zero, _stream(17), tables, Windows(*(np.zeros(1, np.int64),) * 3), "cpu", 0)


# --- byte sidecars (pg_mechanics.md §2.7) -------------------------------------------------------


def _sidecar(toks, seed=5):
    """Per-position raw byte counts unrelated to the tables' (BOS 0), as CaseOps ships them."""
    counts = np.random.default_rng(seed).integers(0, 7, size=len(toks))
    counts[toks == BOS] = 0
    return counts.astype(np.uint16)


def _scored_positions(windows):
    return np.concatenate([np.arange(w.first_target, w.last_target + 1) for w in windows])


@pytest.mark.parametrize("mode", ["sliding", "nonoverlap", "pr298_all_positions"])
def test_sidecar_bytes_are_counted_at_every_scored_position(mode):
    toks = _stream(1 + 6 * 16 + 5)  # 5 tail tokens are dropped by truncation
    counts = _sidecar(toks)
    tables = _tables().with_token_bytes(counts)
    model, cfg = KGram(2), _cfg(mode)
    res = evaluate(model, toks, tables, cfg, "cpu")
    n = 1 + 6 * 16
    wins = {"sliding": lambda: sliding_windows(n, 16, 4), "pr298_all_positions": lambda: pr298_windows(n, 16, 4),
            "nonoverlap": lambda: sliding_windows(n, 16, 16)}[mode]()
    expected = int(counts[_scored_positions(wins)].sum())
    assert res.byte_count == expected
    plain = evaluate(model, toks, _tables(), cfg, "cpu")
    assert plain.byte_count != res.byte_count  # the sidecar really replaced the table formula
    assert (plain.loss_sum, plain.token_count) == (res.loss_sum, res.token_count)
    if mode != "pr298_all_positions":  # (pr298's windows depend on the world size)
        assert expected == int(counts[1:n].sum())
        parts = [evaluate(model, toks, tables, cfg, "cpu", rank=r, world_size=3) for r in range(3)]
        assert sum(p.byte_count for p in parts) == res.byte_count


def test_sidecar_must_match_the_stream():
    toks = _stream(1 + 2 * 16)
    zero = lambda ids: torch.zeros(*ids.shape, V)  # noqa: E731
    short = _tables().with_token_bytes(_sidecar(toks)[:-1])
    with pytest.raises(UserError, match="32 counts but the validation stream has 33 tokens"):
        evaluate(zero, toks, short, _cfg("sliding"), "cpu")
    with pytest.raises(UserError, match="sidecar"):
        score_tokens(zero, toks, short, sliding_windows(len(toks), 16, 4), "cpu", 2)
