"""SequentialLoader: the baseline's contiguous-span semantics, wrap-around, exact resume."""

import json

import numpy as np
import pytest
import torch

from pipeline.data.loader import SequentialLoader
from pipeline.data.shards import write_shard
from pipeline.errors import UserError

SIZES = [10, 7, 13]  # 30 tokens; token value = its position in the stream
TOTAL = sum(SIZES)


@pytest.fixture
def shards(tmp_path):
    paths, start = [], 0
    for i, n in enumerate(SIZES):
        paths.append(tmp_path / f"d_train_{i:06d}.bin")
        write_shard(paths[-1], np.arange(start, start + n))
        start += n
    return paths[::-1]  # the loader must sort them itself


def _stream(start, n):
    return [(start + i) % TOTAL for i in range(n)]


def test_single_rank_contiguous_and_shifted(shards):
    loader = SequentialLoader(shards, seq_len=4)
    x, y = loader.next_batch(8)
    assert x.dtype == torch.int64 and x.shape == (2, 4) and y.shape == (2, 4)
    assert x.flatten().tolist() == _stream(0, 8) and y.flatten().tolist() == _stream(1, 8)
    x, _ = loader.next_batch(8)  # the next batch starts after the 9 consumed tokens
    assert x.flatten().tolist() == _stream(9, 8)


def test_two_ranks_disjoint_adjacent_spans(shards):
    r0 = SequentialLoader(shards, seq_len=2, rank=0, world_size=2)
    r1 = SequentialLoader(shards, seq_len=2, rank=1, world_size=2)
    consumed = 0
    for _ in range(3):  # 3 x 2 x 5 = 30 tokens: crosses both shard boundaries
        x0, y0 = r0.next_batch(4)
        x1, y1 = r1.next_batch(4)
        span0 = x0.flatten().tolist() + [y0.flatten()[-1].item()]
        span1 = x1.flatten().tolist() + [y1.flatten()[-1].item()]
        assert span0 == _stream(consumed, 5) and span1 == _stream(consumed + 5, 5)
        consumed += 10
    assert r0.state_dict() == r1.state_dict()


def test_wraps_around_to_the_first_shard(shards):
    loader = SequentialLoader(shards, seq_len=3)
    seen = []
    for _ in range(5):  # 5 x 13 = 65 tokens > 2 passes over 30
        x, y = loader.next_batch(12)
        seen.append(x.flatten().tolist() + [y.flatten()[-1].item()])
    assert sum(seen, []) == _stream(0, 65)
    assert loader.state_dict() == {"shard": 0, "pos": 5, "tokens_served": 65}


@pytest.mark.parametrize("warm_batches", [0, 1, 2, 3, 5])
def test_resume_reproduces_following_batches(shards, warm_batches):
    a = SequentialLoader(shards, seq_len=2, rank=1, world_size=2)
    for _ in range(warm_batches):  # 10 tokens per batch: ends on boundaries and after wraps
        a.next_batch(4)
    state = json.loads(json.dumps(a.state_dict()))  # plain ints survive a JSON checkpoint
    expected = [a.next_batch(4) for _ in range(4)]
    b = SequentialLoader(shards, seq_len=2, rank=1, world_size=2)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [b.next_batch(4) for _ in range(4)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.state_dict() == a.state_dict()


def test_too_small_and_bad_sizes(shards):
    loader = SequentialLoader(shards, seq_len=4, world_size=2)
    with pytest.raises(UserError) as e:
        loader.next_batch(16)  # needs 2 x 17 = 34 > 30 tokens
    assert "30 tokens" in str(e.value) and "34" in str(e.value)
    with pytest.raises(UserError, match="multiple of train.seq_len"):
        loader.next_batch(6)
    with pytest.raises(UserError, match="does not fit"):
        loader.load_state_dict({"shard": 3, "pos": 0, "tokens_served": 0})


def test_a_size_given_at_construction_serves_next_batch_without_one(shards):
    fixed, asked = SequentialLoader(shards, seq_len=4, local_tokens=8), SequentialLoader(shards, seq_len=4)
    for _ in range(4):  # 4 x 9 tokens: past the wrap-around at 30
        a, b = fixed.next_batch(), asked.next_batch(8)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="local_tokens"):
        asked.next_batch()
