"""Evaluation windows: coverage, context and no tail double counting (pg_mechanics §4.4.1)."""

import numpy as np
import pytest

from eval.windows import (build_windows, nonoverlap_windows, pr298_windows, sliding_windows,
                          truncate_for_eval)
from pipeline.errors import UserError


def _coverage(windows, n):
    counts = np.zeros(n, dtype=np.int64)
    for w in windows:
        counts[w.first_target:w.last_target + 1] += 1
    return counts


def _check_well_formed(windows, n, seq_len):
    for w in windows:
        assert w.start >= 0 and 1 <= w.length <= seq_len and 0 <= w.score_from < w.length
        assert w.last_target <= n - 1  # targets exist in the stream


def test_truncate_for_eval():
    assert truncate_for_eval(10, 4) == 9  # 9 targets -> 2 whole sequences + BOS
    assert truncate_for_eval(9, 4) == 9
    assert truncate_for_eval(8, 4) == 5
    assert truncate_for_eval(62_021_633, 2048) == 62_021_633 - (62_021_632 % 2048)
    with pytest.raises(UserError, match="fewer than"):
        truncate_for_eval(4, 4)


def test_sliding_properties_over_many_shapes():
    cases = 0
    for n in range(2, 41):
        for seq_len in range(1, 11):
            for stride in range(1, seq_len + 1):
                wins = sliding_windows(n, seq_len, stride)
                _check_well_formed(wins, n, seq_len)
                cov = _coverage(wins, n)
                assert cov[0] == 0 and (cov[1:] == 1).all(), (n, seq_len, stride)
                assert wins.num_scored == n - 1
                assert wins[0].score_from == 0 and wins[0].start == 0
                for i, w in enumerate(wins):
                    if 0 < i < len(wins) - 1:
                        assert w.length - w.score_from == stride  # a middle window: last stride
                    for t in range(w.first_target, w.last_target + 1):
                        seen = t - w.start  # tokens w.start .. t-1 are the context of t
                        assert seen >= min(seq_len - stride + 1, t)
                        assert seen >= min(seq_len - stride, t)  # the stated guarantee
                        # t is predicted at window offset t-1-start, from inputs start..t-1
                        assert 0 <= t - 1 - w.start < w.length and t > w.start
                cases += 1
    assert cases == 39 * 55


def test_sliding_known_layout_and_short_tail():
    wins = sliding_windows(17, 8, 4)  # 16 targets
    assert [tuple(w) for w in wins] == [(0, 8, 0), (4, 8, 4), (8, 8, 4)]
    assert [(w.first_target, w.last_target) for w in wins] == [(1, 8), (9, 12), (13, 16)]
    # 14 targets: the last window is short and scores only what is left (no re-scoring); the
    # original rule would also have kept start 12 and re-scored targets 13..14.
    wins = sliding_windows(15, 8, 4)
    assert [tuple(w) for w in wins] == [(0, 8, 0), (4, 8, 4), (8, 6, 4)]


def test_nonoverlap_and_stride_equal_seq_len():
    wins = nonoverlap_windows(17, 8)
    assert [tuple(w) for w in wins] == [(0, 8, 0), (8, 8, 0)]
    same = sliding_windows(17, 8, 8)
    assert np.array_equal(same.starts, wins.starts)
    assert np.array_equal(same.lengths, wins.lengths)
    assert np.array_equal(same.score_from, wins.score_from)
    odd = nonoverlap_windows(12, 8)  # untruncated stream: the short remainder is scored too
    assert [tuple(w) for w in odd] == [(0, 8, 0), (8, 3, 0)]
    assert (_coverage(odd, 12)[1:] == 1).all()


def test_pr298_windows_score_every_position_of_full_windows():
    n, seq_len, stride = 1 + 4 * 8, 8, 2
    wins = pr298_windows(n, seq_len, stride)
    assert wins.starts.tolist() == list(range(0, 25, 2))  # start + 8 < 33
    assert len(wins) == 13 and (wins.lengths == 8).all() and (wins.score_from == 0).all()
    assert wins.num_scored == 13 * 8
    cov = _coverage(wins, n)
    assert cov[16] == seq_len // stride  # an interior token is scored 4 times
    assert cov[1] == 1 and cov[32] == 1  # the ends fewer times
    # Per-rank slices: windows never cross a rank boundary, so the set depends on world size.
    two = pr298_windows(n, seq_len, stride, world_size=2)
    assert two.starts.tolist() == [0, 2, 4, 6, 8, 16, 18, 20, 22, 24]
    assert int((two.starts + two.lengths).max()) <= n - 1


def test_split_is_contiguous_and_complete():
    wins = sliding_windows(101, 16, 4)
    parts = [wins.split(r, 3) for r in range(3)]
    assert sum(len(p) for p in parts) == len(wins)
    assert np.array_equal(np.concatenate([p.starts for p in parts]), wins.starts)
    with pytest.raises(UserError):
        wins.split(3, 3)


def test_bad_arguments_raise_user_errors():
    with pytest.raises(UserError, match="stride"):
        sliding_windows(20, 8, 0)
    with pytest.raises(UserError, match="stride"):
        sliding_windows(20, 8, 9)
    with pytest.raises(UserError, match="seq_len"):
        nonoverlap_windows(20, 0)
    with pytest.raises(UserError, match="no targets"):
        sliding_windows(1, 8, 4)
    with pytest.raises(UserError, match="eval.mode"):
        build_windows("strided", 20, 8, 4)
    assert len(build_windows("pr298_all_positions", 17, 8, 4)) == 3
