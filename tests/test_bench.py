"""`pgolf bench`: its key=value figures on a tiny CPU run, the token count, the FLOPs count and the
synthetic shards it writes.

    .venv/bin/python -m pytest -q tests/test_bench.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SMALL_VOCAB, tiny_recipe
from test_cli import cli_inprocess, sets

KEYS = ("recipe", "device", "accum", "passes_per_step", "compile", "autocast", "host_sync_every", "params",
        "tokens_per_step", "warmup_steps", "compile_warmup_s", "first_step_s", "steps", "tokens_counted",
        "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "loss_last", "flops_per_token",
        "achieved_flops", "peak_flops", "peak_flops_source", "mfu", "peak_mem_bytes", "peak_mem_kind",
        "eval_seq_len", "eval_stride", "eval_tokens", "eval_s", "eval_tokens_per_s")


def _figures(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        for pair in line.split():
            if "=" in pair:
                k, v = pair.split("=", 1)
                out[k] = v
    return out


def _formula_flops_per_token(recipe) -> int:
    """6 x (linear weights + output head) + 12 L T d: the baseline trunk's count at full T."""
    from pipeline.model import build_model

    m = recipe.model
    with torch.device("meta"):
        model = build_model(m)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    return 6 * (linear + m.vocab_size * m.model_dim) + 12 * m.num_layers * recipe.train.seq_len * m.model_dim


@pytest.mark.parametrize("accum", [1, 2])
def test_bench_tiny_prints_sane_figures_and_counts_every_token(tmp_path, accum, one_thread):
    extra = (f"train.reference_world_size={accum}",)
    proc = cli_inprocess("bench", "tiny", "--steps", "3", "--warmup", "1", "--eval-tokens", "1024",
                         "--device", "cpu", *sets(*extra), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    f = _figures(proc.stdout)
    missing = [k for k in KEYS if k not in f]
    assert not missing, f"missing keys {missing} in:\n{proc.stdout}"
    recipe = tiny_recipe(*extra)
    assert (f["recipe"], f["device"], f["compile"], f["autocast"]) == ("tiny", "cpu", "off", "off")
    assert int(f["accum"]) == accum and int(f["tokens_per_step"]) == recipe.train.batch_tokens
    # the loader served exactly the timed steps' tokens
    assert int(f["steps"]) * int(f["tokens_per_step"]) == int(f["tokens_counted"]) == 3 * 256
    med, lo, hi = float(f["step_ms_median"]), float(f["step_ms_min"]), float(f["step_ms_max"])
    assert 0 < lo <= med <= hi
    assert float(f["tokens_per_s"]) == pytest.approx(256 / (med / 1000), rel=1e-3, abs=1)
    assert int(f["flops_per_token"]) == _formula_flops_per_token(recipe)
    assert float(f["achieved_flops"]) == pytest.approx(int(f["flops_per_token"]) * float(f["tokens_per_s"]), rel=1e-3)
    assert f["peak_flops_source"].startswith("measured_matmul_1024:fp32") and float(f["mfu"]) > 0
    assert float(f["mfu"]) == pytest.approx(float(f["achieved_flops"]) / float(f["peak_flops"]), rel=1e-2, abs=1e-4)
    assert f["peak_mem_kind"] in ("cpu_rss_peak_growth", "cpu_process_max_rss") and int(f["peak_mem_bytes"]) >= 0
    assert np.isfinite(float(f["loss_last"])) and 0 < float(f["loss_last"]) < 2 * np.log(SMALL_VOCAB)
    assert 0 < int(f["eval_tokens"]) <= 1024 and float(f["eval_tokens_per_s"]) > 0
    assert (int(f["eval_seq_len"]), int(f["eval_stride"])) == (32, 16)


def test_bench_eval_only_and_user_errors(tmp_path, one_thread):
    proc = cli_inprocess("bench", "tiny", "--steps", "0", "--warmup", "0", "--eval-tokens", "512", "--device", "cpu",
                         *sets(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    f = _figures(proc.stdout)
    assert f["steps"] == "0" and f["tokens_counted"] == "0" and "step_ms_median" not in f
    assert int(f["eval_tokens"]) > 0
    bad = cli_inprocess("bench", "tiny", "--device", "cpu", *sets("train.attention_kernel=efficient"), cwd=tmp_path)
    assert bad.returncode == 2 and "train.attention_kernel=efficient is a CUDA kernel" in bad.stderr


def test_bench_never_writes_over_a_folder_it_did_not_make(tmp_path, one_thread):
    real = tmp_path / "real"
    real.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_train_000005.bin", "fineweb_val_000000.bin"):
        (real / name).write_bytes(b"REAL")
    proc = cli_inprocess("bench", "tiny", "--steps", "0", "--warmup", "0", "--device", "cpu", "--data-dir", str(real),
                         *sets(), cwd=tmp_path)
    assert proc.returncode == 2 and "is not empty and was not made by pgolf bench" in proc.stderr
    assert sorted(p.read_bytes() for p in real.iterdir()) == [b"REAL"] * 3  # untouched
    mine = tmp_path / "mine"
    for _ in range(2):  # a folder bench made is bench's to rewrite
        again = cli_inprocess("bench", "tiny", "--steps", "0", "--warmup", "0", "--device", "cpu", "--eval-tokens",
                              "256", "--data-dir", str(mine), *sets(), cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
    assert (mine / ".pgolf_bench").exists() and len(list(mine.glob("fineweb_val_*.bin"))) == 1


def test_bench_eval_tokens_below_one_window_are_refused_before_training(tmp_path):
    zero = cli_inprocess("bench", "tiny", "--eval-tokens", "0", *sets(), cwd=tmp_path)
    assert zero.returncode == 2 and "--eval-tokens" in zero.stderr
    few = cli_inprocess("bench", "tiny", "--eval-tokens", "5", "--device", "cpu", *sets(), cwd=tmp_path)
    assert few.returncode == 2 and "fewer than one eval window" in few.stderr and "step_ms" not in few.stdout


def test_synthetic_shards_are_challenge_format_with_bos(tmp_path):
    from pipeline.bench import BOS_ID, write_synthetic_shards
    from pipeline.data.shards import list_shards, load_shard, read_header

    write_synthetic_shards(tmp_path, 320, train_tokens=10_000, val_tokens=3_001, seed=5)
    train, val = list_shards(tmp_path, "train"), list_shards(tmp_path, "val")
    assert [p.name for p in train] == [f"fineweb_train_00000{i}.bin" for i in range(4)]
    assert sum(read_header(p) for p in train) == 10_000 and read_header(val[0]) == 3_001
    header = np.fromfile(val[0], dtype="<i4", count=3)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 3_001
    toks = np.asarray(load_shard(val[0]))
    assert toks[0] == BOS_ID and 0 <= toks.min() and toks.max() < 320
    docs = np.count_nonzero(toks == BOS_ID)
    assert 1 <= docs <= 10  # ~ one document per 1,000 tokens


def test_peak_flops_table_by_device_name():
    from pipeline.bench import peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for_name("NVIDIA H200", "tf32") == 494.7e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_for_name("Some Other GPU", "bf16") is None
