"""The challenge shard format: exact bytes, validation errors, listing, streaming writer."""

import numpy as np
import pytest

from pipeline.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardWriter,
    list_shards,
    load_byte_sidecar,
    load_shard,
    read_header,
    shard_name,
    sidecar_name,
    write_shard,
)
from pipeline.errors import UserError


def _shard(tmp_path, tokens=(0, 1, 65535, 1234, 7)):
    path = tmp_path / "data_train_000000.bin"
    write_shard(path, np.array(tokens))
    return path


def test_round_trip_values_dtype_and_size(tmp_path):
    path = _shard(tmp_path)
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    assert read_header(path) == 5
    toks = load_shard(path)
    assert toks.dtype == np.dtype("<u2")
    assert toks.tolist() == [0, 1, 65535, 1234, 7]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_header_fields_and_little_endian_payload(tmp_path):
    path = _shard(tmp_path, [258, 1])
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, 1, 2]
    assert not header[3:].any()
    assert raw[HEADER_BYTES:] == bytes([2, 1, 1, 0])  # 258 = 0x0102 little-endian, then 1


def test_empty_shard_round_trip(tmp_path):
    path = _shard(tmp_path, [])
    assert read_header(path) == 0 and load_shard(path).size == 0


def test_token_out_of_range_is_refused(tmp_path):
    with pytest.raises(UserError, match="65536"):
        write_shard(tmp_path / "x.bin", [1, 65536])
    assert not list(tmp_path.iterdir())


def _patch_header(path, index, value):
    raw = bytearray(path.read_bytes())
    raw[4 * index : 4 * index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def test_bad_magic(tmp_path):
    path = _shard(tmp_path)
    _patch_header(path, 0, 12345)
    with pytest.raises(UserError) as e:
        read_header(path)
    assert "expected 20240520, got 12345" in str(e.value) and str(path) in str(e.value)


def test_bad_version(tmp_path):
    path = _shard(tmp_path)
    _patch_header(path, 1, 2)
    with pytest.raises(UserError, match="version: expected 1, got 2"):
        load_shard(path)


def test_truncated_and_oversized_payload(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError) as e:
        read_header(path)
    assert "truncated" in str(e.value) and f"expected {HEADER_BYTES + 10}" in str(e.value)
    assert f"has {HEADER_BYTES + 8}" in str(e.value)
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(UserError, match="oversized"):
        read_header(path)


def test_empty_and_short_files(tmp_path):
    empty = tmp_path / "a_val_000000.bin"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_header(empty)
    empty.write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="truncated shard header"):
        read_header(empty)


def test_list_shards_sorted_and_filtered(tmp_path):
    for name in ["d_train_000001.bin", "d_train_000000.bin", "d_val_000000.bin", "d_val_bytes_000000.bin"]:
        write_shard(tmp_path / name, [1])
    assert [p.name for p in list_shards(tmp_path, "train")] == ["d_train_000000.bin", "d_train_000001.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["d_val_000000.bin"]


def test_list_shards_missing_or_empty_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as e:
        list_shards(missing, "train")
    assert str(missing) in str(e.value) and "pgolf data prepare" in str(e.value)
    with pytest.raises(UserError) as e:
        list_shards(tmp_path, "val")
    assert str(tmp_path) in str(e.value) and "pgolf data prepare" in str(e.value)


def test_shard_name():
    assert shard_name("fineweb", "val", 3) == "fineweb_val_000003.bin"


def test_writer_splits_stream_at_shard_size(tmp_path):
    w = ShardWriter(tmp_path, "p", "train", shard_size=5)
    for chunk in ([1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12, 13]):
        w.add(chunk)
    paths = w.close()
    assert [p.name for p in paths] == [shard_name("p", "train", i) for i in range(3)]
    assert [read_header(p) for p in paths] == [5, 5, 3]
    assert np.concatenate([load_shard(p) for p in paths]).tolist() == list(range(1, 14))
    assert w.n_tokens == 13


# --- byte sidecars (pg_mechanics.md §1.2, §2.7) ----------------------------------------------


def _val_with_sidecars(tmp_path, sizes=(4, 3), sidecars=True):
    rng = np.random.default_rng(0)
    counts = []
    for i, n in enumerate(sizes):
        write_shard(tmp_path / shard_name("fw", "val", i), rng.integers(0, 300, n))
        c = rng.integers(0, 9, n)
        counts.append(c)
        if sidecars:
            write_shard(tmp_path / sidecar_name("fw", i), c)
    return list_shards(tmp_path, "val"), np.concatenate(counts)


def test_sidecar_pairs_with_val_shards_in_order(tmp_path):
    assert sidecar_name("fineweb", 2) == "fineweb_val_bytes_000002.bin"
    paths, counts = _val_with_sidecars(tmp_path)
    got = load_byte_sidecar(paths)
    assert got.dtype == np.uint16 and got.tolist() == counts.tolist()


def test_no_sidecar_is_none(tmp_path):
    paths, _ = _val_with_sidecars(tmp_path, sidecars=False)
    assert load_byte_sidecar(paths) is None


def test_sidecar_missing_extra_or_mismatched_is_refused(tmp_path):
    paths, _ = _val_with_sidecars(tmp_path)
    (tmp_path / sidecar_name("fw", 1)).unlink()
    with pytest.raises(UserError, match="not fw_val_bytes_000001.bin"):
        load_byte_sidecar(paths)
    write_shard(tmp_path / sidecar_name("fw", 1), [1, 2])  # 2 counts for 3 tokens
    with pytest.raises(UserError, match="has 2 counts but fw_val_000001.bin has 3 tokens"):
        load_byte_sidecar(paths)
    write_shard(tmp_path / sidecar_name("fw", 1), [1, 2, 3])
    write_shard(tmp_path / sidecar_name("fw", 2), [1])  # no val shard 2
    with pytest.raises(UserError, match="fw_val_bytes_000002.bin: byte sidecar without a matching val shard"):
        load_byte_sidecar(paths)
