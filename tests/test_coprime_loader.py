"""Tests for the PR #684 / #726 coprime-stride loader (pipeline.data.coprime_loader).

The synthetic shards hold globally unique, consecutive token ids (shard i starts where shard
i-1 ended, 48,000 ids in all), so any row can be decoded back to (shard, offset) and checked
to be a true contiguous slice.
"""

import collections
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.config import CoprimeLoaderConfig
from pipeline.data.coprime_loader import (CoprimeShardLoader, WindowPlanner,
                                          global_seqs_per_micro_step, mix_schedule,
                                          order_seed, read_windows)
from pipeline.data.shards import load_shard, shard_name, write_shard
from pipeline.errors import UserError

SIZES = [3000, 5000, 8000, 12000, 20000]
BASES = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
L = 64
GLOBAL = 16


def _write(dir_, names=None):
    dir_.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(SIZES):
        p = dir_ / (names[i] if names else shard_name("t", "train", i))
        write_shard(p, np.arange(BASES[i], BASES[i] + n))
        paths.append(p)
    return paths


@pytest.fixture
def shards(tmp_path):
    return _write(tmp_path / "a")


def _decode(x, y):
    """(shard, offset) of each row, after checking the row is a contiguous L+1 slice."""
    out = []
    for xr, yr in zip(x.tolist(), y.tolist()):
        row = np.array(xr + yr[-1:])
        assert xr[1:] == yr[:-1]
        si = int(np.searchsorted(BASES, row[0], side="right") - 1)
        off = int(row[0] - BASES[si])
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + L + 1))
        assert 0 <= off and off + L + 1 <= SIZES[si]
        out.append((si, off))
    return out


def _planner(world=1, cfg=CoprimeLoaderConfig(), paths=None):
    names = [p.name for p in paths] if paths else [shard_name("t", "train", i) for i in range(5)]
    return WindowPlanner(SIZES, L, GLOBAL, world, order_seed(names, SIZES), cfg)


def test_cursor_visits_every_block_once_per_cycle():
    n = 5000
    p = WindowPlanner([n], L, 8, 1, seed=123)
    phases = set()
    for _ in range(6):
        first = p.take(0, 1)  # starts a new cycle and draws phase, start and stride
        phase, m = p.phase[0], p.blocks[0]
        assert 0 <= phase <= min(L - 1, n - L - 1)
        assert m == (n - 1 - phase) // L
        # uneven chunks must still cover each block exactly once before the cycle ends
        offs = first + p.take(0, 10) + p.take(0, m - 11)
        assert sorted(offs) == [phase + b * L for b in range(m)]
        assert p.remaining(0) == 0
        phases.add(phase)
    assert len(phases) > 1  # the phase is re-drawn per cycle
    # phi ranges over exactly [0, min(L-1, n-L-1)]: both caps, on a 2-3 block shard
    for n, cap in ((2 * L + 10, L - 1), (L + 2, 1), (L + 20, 19)):
        q = WindowPlanner([n], L, 4, 1, seed=5)
        seen = set()
        for _ in range(2000):
            q.take(0, 1)  # opens a new cycle
            seen.add(q.phase[0])
            q.take(0, q.remaining(0))
        assert seen == set(range(cap + 1))


def test_windows_are_true_slices_matching_the_plan(shards):
    ref = _planner(paths=shards)
    with CoprimeShardLoader(shards, L, GLOBAL, background=False) as ld:
        for _ in range(60):  # 960 windows: several cursor cycles of the small shards
            x, y = ld.next_batch()
            assert x.shape == y.shape == (GLOBAL, L) and x.dtype == y.dtype == torch.int64
            assert _decode(x, y) == ref.plan()


def test_deterministic_and_independent_of_run_seed(shards, tmp_path):
    def batches(paths, seed, background, n=6):
        torch.manual_seed(seed)
        np.random.seed(seed)
        with CoprimeShardLoader(paths, L, GLOBAL, background=background) as ld:
            return [torch.cat(ld.next_batch(), 1) for _ in range(n)]

    a = batches(shards, 0, True)
    for other in (batches(shards, 1, False), batches(_write(tmp_path / "moved"), 7, True)):
        assert all(torch.equal(u, v) for u, v in zip(a, other))
    renamed = [shard_name("t", "train", i) for i in range(5)]
    renamed[2] = "other_name.bin"
    c = batches(_write(tmp_path / "renamed", renamed), 0, True)
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_ranks_get_disjoint_windows_whose_union_is_the_global_batch(shards):
    ref = _planner(world=2, paths=shards)
    with CoprimeShardLoader(shards, L, GLOBAL, 0, 2, background=False) as r0, \
            CoprimeShardLoader(shards, L, GLOBAL, 1, 2, background=True) as r1:
        for _ in range(5):
            w0, w1 = _decode(*r0.next_batch()), _decode(*r1.next_batch())
            plan = ref.plan()
            assert len(w0) == len(w1) == GLOBAL // 2
            assert w0 == plan[0::2] and w1 == plan[1::2]
            assert len(set(plan)) == GLOBAL  # no repeats in these batches, so disjoint:
            assert not set(w0) & set(w1) and set(w0) | set(w1) == set(plan)


@pytest.mark.parametrize("world,n_shards,batch,expected", [
    (8, 100, 384, [8, 36, 64, 64]),   # hi = 8 * world = 64, not the README's 32
    (1, 100, 48, [8, 20, 32, 32]),
    (2, 100, 384, [8, 20, 32, 32]),
    (16, 200, 384, [16, 72, 128, 128]),
    (8, 40, 384, [8, 24, 40, 40]),    # capped by the shard count
    (8, 5, 384, [5, 5, 5, 5]),
    (8, 100, 20, [8, 14, 20, 20]),    # capped by the batch size
])
def test_mix_schedule_values(world, n_shards, batch, expected):
    got = [mix_schedule(k, world, n_shards, batch) for k in (0, 900, 1800, 5000)]
    assert [w for _, w in got] == expected
    assert [a for a, _ in got] == pytest.approx([0.9, 0.7, 0.5, 0.5])


def test_planner_mixes_exactly_width_shards_round_robin():
    cfg = CoprimeLoaderConfig(mix_warmup_batches=4)
    p = WindowPlanner([10_000] * 100, L, 384, 8, seed=1, cfg=cfg)
    for expected in (8, 22, 36, 50, 64, 64):
        w = p.plan()
        assert len(w) == 384
        counts = collections.Counter(si for si, _ in w)
        assert len(counts) == expected
        # round one gives every mixed shard one slot before any shard gets a second
        assert len({si for si, _ in w[:expected]}) == expected
    # draws favour shards with more unseen blocks (alpha > 0)
    q = WindowPlanner([200_000] + [3_000] * 9, L, 32, 1, seed=3)
    big = sum(si == 0 for _ in range(50) for si, _ in q.plan())
    assert big > 50 * 32 / 10 * 3


def test_planner_shuffles_within_shard_and_reorders_each_round():
    full_width = CoprimeLoaderConfig(mix_warmup_batches=0)
    p = WindowPlanner([50_000] * 100, L, 384, 8, seed=2, cfg=full_width)
    w = p.plan()
    counts = collections.Counter(si for si, _ in w)
    width, twice = len(counts), sum(c >= 2 for c in counts.values())
    round0, round1 = [si for si, _ in w[:width]], [si for si, _ in w[width:width + twice]]
    assert sorted(round1) == sorted(si for si, c in counts.items() if c >= 2)
    assert [si for si in round0 if counts[si] >= 2] != round1  # a fresh order per round
    # Unshuffled, a shard's blocks would step by the cursor stride; here they must not.
    strided = checked = 0
    for si, c in counts.items():
        if c >= 4 and p.used[si] >= c:  # no cursor wrap inside this batch
            blocks = [(off - p.phase[si]) // L for s, off in w if s == si]
            steps = {(b - a) % p.blocks[si] for a, b in zip(blocks, blocks[1:])}
            strided += steps == {p.stride[si]}
            checked += 1
    assert checked >= 10 and strided == 0


@pytest.mark.parametrize("background", [True, False])
def test_resume_gives_identical_following_batches(shards, background):
    with CoprimeShardLoader(shards, L, GLOBAL, background=background) as a:
        for _ in range(7):
            a.next_batch()
        if background:  # let the thread run ahead, so the test can tell consumed from built
            deadline = time.monotonic() + 10
            while a.planner.batches_built < 7 + 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert a.planner.batches_built >= 7 + 3
        sd = pickle.loads(pickle.dumps(a.state_dict()))
        assert sd["batches_built"] == 7  # consumed, not prefetched
        expected = [torch.cat(a.next_batch(), 1) for _ in range(5)]
        a.load_state_dict(sd)  # rewinding a live loader drops its prefetched batches
        assert all(torch.equal(torch.cat(a.next_batch(), 1), e) for e in expected)
    with CoprimeShardLoader(shards, L, GLOBAL, background=not background) as b:
        b.next_batch()
        b.load_state_dict(sd)
        assert all(torch.equal(torch.cat(b.next_batch(), 1), e) for e in expected)
    with CoprimeShardLoader(shards, L, 2 * GLOBAL, background=False) as c:
        with pytest.raises(UserError, match="batch_seqs"):
            c.load_state_dict(sd)


def test_state_dict_survives_weights_only_torch_load(shards, tmp_path):
    with CoprimeShardLoader(shards, L, GLOBAL, background=False) as a:
        a.next_batch()
        torch.save(a.state_dict(), tmp_path / "s.pt")
        sd = torch.load(tmp_path / "s.pt", weights_only=True)
        want = a.next_batch()
        a.load_state_dict(sd)
        assert torch.equal(a.next_batch()[0], want[0])


def test_slab_merging_matches_naive_reads(shards):
    toks = [load_shard(p) for p in shards]
    rng = np.random.default_rng(0)
    span = L + 1
    # random windows, plus adjacent blocks (1-token overlap), duplicates and exact gaps
    wins = [(int(s), int(rng.integers(SIZES[s] - span + 1))) for s in rng.integers(5, size=200)]
    wins += [(1, 100), (1, 164), (1, 228), (1, 100), (3, 0), (3, 65 + L // 2), (3, 66 + L // 2)]
    naive = np.stack([np.asarray(toks[s][o:o + span]) for s, o in wins])
    for gap in (None, 0, L // 2, 10**9):
        np.testing.assert_array_equal(read_windows(toks, wins, span, gap), naive)


def test_close_stops_the_thread(shards):
    ld = CoprimeShardLoader(shards, L, GLOBAL, background=True)
    ld.next_batch()
    t = ld._thread
    assert t.is_alive() and t.daemon
    ld.close()
    assert not t.is_alive()
    assert not any(th is t for th in threading.enumerate())
    with pytest.raises(RuntimeError):
        ld.next_batch()
    ld.close()  # idempotent


def test_user_errors(tmp_path, shards):
    with pytest.raises(UserError, match="no train shards"):
        CoprimeShardLoader([], L, GLOBAL)
    short = tmp_path / "short.bin"
    write_shard(short, np.arange(L + 1))
    with pytest.raises(UserError, match="seq_len \\+ 2"):
        CoprimeShardLoader([shards[0], short], L, GLOBAL, background=False)
    with pytest.raises(UserError, match="multiple of world_size"):
        CoprimeShardLoader(shards, L, 15, 0, 2, background=False)
    ok = tmp_path / "ok.bin"
    write_shard(ok, np.arange(L + 2))
    with CoprimeShardLoader([ok], L, 4, background=False) as ld:
        x, y = ld.next_batch()
        assert set(x[:, 0].tolist()) <= {0, 1}  # phase 0 or 1, one block
        assert torch.equal(y - x, torch.ones_like(x))


def test_global_seqs_per_micro_step():
    assert global_seqs_per_micro_step(524_288, 2048, 1, 8) == 256
    assert global_seqs_per_micro_step(524_288, 2048, 8, 1) == 32
    assert global_seqs_per_micro_step(786_432, 2048, 1, 8) == 384  # PR #684's 384 windows
    assert global_seqs_per_micro_step(10_000, 1000, 2, 2) == 4  # remainder dropped, as #684
    with pytest.raises(UserError):
        global_seqs_per_micro_step(4096, 2048, 1, 8)


def test_order_seed_is_fnv1a_of_names_and_sizes():
    assert order_seed([], []) == 0xCBF29CE484222325  # the FNV-1a 64 offset basis
    a = order_seed(["x_train_000000.bin"], [100])
    assert a != order_seed(["x_train_000000.bin"], [101])
    assert a != order_seed(["y_train_000000.bin"], [100])


@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device")
def test_cuda_copy_stream_path_matches_cpu(shards):
    with CoprimeShardLoader(shards, L, GLOBAL, background=True) as cpu, \
            CoprimeShardLoader(shards, L, GLOBAL, device="cuda", background=True) as gpu:
        for k in range(12):
            xc, yc = cpu.next_batch()
            xg, yg = gpu.next_batch()
            assert xg.is_cuda and xg.dtype == torch.int64
            # touch the data on the default stream, as a training step would
            assert torch.equal(xg.cpu(), xc) and torch.equal((yg + 0).cpu(), yc)
            if k == 5:
                sd = gpu.state_dict()
                want = [torch.cat(cpu.next_batch(), 1) for _ in range(3)]
                gpu.load_state_dict(sd)
                for w in want:
                    assert torch.equal(torch.cat(gpu.next_batch(), 1).cpu(), w)
