"""Two gloo processes on CPU follow the same training trajectory as one process with gradient
accumulation (reference_world_size 2), and a two-rank run resumes from its per-rank state.

    .venv/bin/python -m pytest -q tests/test_distributed.py
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_recipe

SETS = ("train.reference_world_size=2", "train.batch_tokens=512", "train.max_steps=6", "train.checkpoint_every=3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data_dir: str, out_dir: str, stop_at: int, extra: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    info = init("cpu")
    trainer = Trainer(tiny_recipe(*SETS, *extra), list_shards(data_dir, "train"), out_dir, info, log=lambda s: None)
    trainer.run(stop_at_step=stop_at or None)
    if rank == 0:
        torch.save(trainer.model.state_dict(), os.path.join(out_dir, "final.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _two_ranks(data_dir, out_dir, stop_at=0, extra=()):
    mp.spawn(_rank_main, args=(2, _free_port(), str(data_dir), str(out_dir), stop_at, extra), nprocs=2, join=True)
    return torch.load(os.path.join(out_dir, "final.pt"), weights_only=True)


def test_two_ranks_match_one_process_with_accumulation_and_resume(small_data, tmp_path):
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    single = Trainer(tiny_recipe(*SETS), list_shards(small_data, "train"), tmp_path / "single", init("cpu"),
                     log=lambda s: None)
    assert single.accum == 2
    single.run()
    reference = single.model.state_dict()

    straight = _two_ranks(small_data, tmp_path / "two")
    for k, v in reference.items():
        assert torch.allclose(v, straight[k], atol=2e-5, rtol=1e-4), f"{k}: 2 ranks diverge from 1 process"

    # stop both ranks at step 3 (each saves its own Muon shard), then resume to step 6
    _two_ranks(small_data, tmp_path / "resumed", stop_at=3)
    assert {p.name for p in (tmp_path / "resumed").glob("optim_rank*.pt")} == {"optim_rank0.pt", "optim_rank1.pt"}
    resumed = _two_ranks(small_data, tmp_path / "resumed")
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), f"{k}: two-rank resume left the trajectory"


def test_coprime_loader_one_process_reads_what_two_ranks_read(small_data, tmp_path):
    """PR #684's loader: accumulation micro-steps act as virtual ranks, so the data (and with
    it the trajectory) do not depend on how many processes share the batch."""
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    extra = ("train.loader=coprime", "train.coprime.queue_depth=2")
    single = Trainer(tiny_recipe(*SETS, *extra), list_shards(small_data, "train"), tmp_path / "one", init("cpu"),
                     log=lambda s: None)
    single.run()
    two = _two_ranks(small_data, tmp_path / "two", extra=extra)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, two[k], atol=2e-5, rtol=1e-4), f"{k}: coprime data differs between 1 and 2 ranks"


def test_resume_with_another_world_size_is_refused(small_data, tmp_path):
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.errors import UserError
    from pipeline.stages.train import Trainer

    _two_ranks(small_data, tmp_path, stop_at=3)
    with pytest.raises(UserError, match="written by 2 processes"):
        Trainer(tiny_recipe(*SETS), list_shards(small_data, "train"), tmp_path, init("cpu"), log=lambda s: None).run()


def test_torchrun_two_processes_give_one_processs_val_bpb_through_ttt(small_data, tmp_path):
    """`torchrun --nproc_per_node=2 -m pipeline run` and one process: the same trajectory through
    training, evaluation and score-first TTT (several TTT steps per chunk: ttt.batch_seqs=8 of 16)."""
    import json
    import subprocess
    import sys

    from test_cli import sets

    extra = sets("train.reference_world_size=2", "train.batch_tokens=512", "train.max_steps=4", "ttt.batch_seqs=8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = subprocess.run([sys.executable, "-m", "pipeline", "run", "tiny", "--data", str(small_data), "--device", "cpu",
                          "--out", str(tmp_path / "one"), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pipeline", "run", "tiny", "--data", str(small_data), "--device", "cpu",
                          "--out", str(tmp_path / "two"), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    (a,), (b,) = list((tmp_path / "one").rglob("report.json")), list((tmp_path / "two").rglob("report.json"))
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["world_size"] == 2 and ra["world_size"] == 1
    assert ra["val_bpb_ttt"] is not None and abs(ra["val_bpb"] - rb["val_bpb"]) < 1e-6
    assert abs(ra["val_bpb_roundtrip"] - rb["val_bpb_roundtrip"]) < 1e-6
    assert ra["val_tokens"] == rb["val_tokens"] and ra["val_bytes"] == rb["val_bytes"]
