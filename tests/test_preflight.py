"""Preflight (pipeline.preflight) and the micro-batch setting (train.micro_batch_seqs).

- the estimate's activation term equals, to the byte, what the same pass allocates on real
  tensors, for every recipe; it follows the per-layer count the module docstring derives;
- its total is within 30% of the peak resident memory a real training step adds on CPU;
- preflight refuses a run whose estimate exceeds the (monkeypatched) available memory, naming
  both numbers and the fixes, and the micro-batch it proposes does fit;
- splitting micro-batches into passes keeps the trajectory (both loaders, and under DDP).

    .venv/bin/python -m pytest -q tests/test_preflight.py
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL_VOCAB, make_trainer, tiny_recipe
from pipeline import activation_trace
from pipeline import preflight as pf
from pipeline.distributed import DistInfo
from pipeline.errors import UserError
from pipeline.recipe import load_recipe

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# Tiny versions of every recipe (the parts stay on; only sizes shrink).
SMALL = (f"model.vocab_size={SMALL_VOCAB}", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
         "train.seq_len=32", "train.batch_tokens=256", "train.reference_world_size=1", "train.prime_steps=0")
EXTRA = {
    "sidecar48": ("model.num_layers=5", "model.sidecar.layers=[2,3,4]", "model.bigram.buckets=64",
                  "model.bigram.dim=8", "model.sidecar.hidden=8", "model.rope.dims=8",
                  "model.rope.ntk_train_seq_len=16", "train.coprime.queue_depth=2"),
    "true_evolving": ("model.num_layers=2", "model.num_kv_heads=2"),
    "depth_recurrent": ("model.recurrent.k_rank=8", "model.recurrent.td_rank=4", "model.recurrent.gru_rank=4"),
    "frontier": ("model.num_layers=2", "model.loop.start=0", "model.loop.end=0", "model.parallel.start_layer=1"),
}
# Every recipe that defines a model (the others extend one and change only export or optimizer).
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")
                 if re.search(r"^model:", p.read_text(), re.MULTILINE))


def small(name: str, *sets: str):
    family = "depth_recurrent" if name.startswith("depth_recurrent") else \
        "true_evolving" if name.startswith("true_evolving") else name
    return load_recipe(name, list(SMALL) + list(EXTRA.get(family, ("model.num_layers=2",))) + list(sets))


def real_pass_peak(recipe, seqs: int) -> int:
    """`LiveBytes` over one real forward + backward of `seqs` sequences, gradients existing."""
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(recipe.model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, recipe.model.vocab_size, (seqs, recipe.train.seq_len))
    model.plan_training(recipe.train.max_steps)  # the estimate traces the last step (looped layers on)
    tracker = activation_trace.LiveBytes()
    with tracker:
        loss = model.training_loss(ids, ids, recipe.train.max_steps - 1)[0]
        loss.backward()
    return tracker.peak


@pytest.mark.parametrize("name", RECIPES)
def test_activation_estimate_is_what_a_real_pass_allocates(name, one_thread):
    recipe = small(name)
    est = pf.estimate_memory(recipe, 1, "cpu")
    assert est.local_seqs == est.chunk_seqs == 8
    assert est.activations == real_pass_peak(recipe, 8)


def test_per_layer_count_of_the_baseline_block(one_thread):
    """The module docstring's count: (11 + 2 mlp_mult) D + 3 kv + 2H + KV + 2 floats per token per
    layer in fp32, plus RoPE's cos and sin tables ([T, hd/2] each, for q and for k)."""
    D, H, KV, B, T, mult = 64, 4, 2, 16, 64, 2
    hd, kv = D // H, KV * (D // H)
    sets = [f"model.model_dim={D}", f"model.num_heads={H}", f"model.num_kv_heads={KV}", f"model.mlp_mult={mult}",
            "model.vocab_size=256", f"train.seq_len={T}", f"train.batch_tokens={B * T}",
            "train.reference_world_size=1"]
    act = {L: pf.estimate_memory(load_recipe("baseline", sets + [f"model.num_layers={L}"]), 1, "cpu").activations
           for L in (2, 3)}
    per_token_floats = (11 + 2 * mult) * D + 3 * kv + 2 * H + KV + 2
    rope_floats = 2 * 2 * T * (hd // 2)  # cos and sin, for q and for k: not per token
    assert act[3] - act[2] == 4 * (per_token_floats * B * T + rope_floats)
    assert per_token_floats == 16.5 * D + 2 * H + KV + 2  # the docstring's short form (kv = D/2, mlp_mult 2)


def test_cuda_emulation_follows_cuda_autocast():
    """CPU autocast already runs linear/matmul/SDPA in bf16; CUDA also runs rms_norm, pow (the
    relu^2 square), softmax, sum, ... in float32, which the emulation adds."""
    import torch.nn.functional as F

    x, w = torch.randn(2, 8, 16), torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.linear(x, w)
        assert h.dtype == torch.bfloat16 and torch.relu(h).square().dtype == torch.bfloat16  # CPU policy
        with activation_trace.CudaFp32Policy():
            assert F.linear(x, w).dtype == torch.bfloat16
            assert torch.relu(h).square().dtype == torch.float32
            assert F.rms_norm(h, (16,)).dtype == torch.float32 and h.sum().dtype == torch.float32
            assert F.log_softmax(h, -1).dtype == torch.float32 and torch.tanh(h).dtype == torch.bfloat16


def test_cuda_estimate_saves_less_per_layer_than_fp32(one_thread):
    sets = ["model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=256",
            "train.seq_len=64", "train.batch_tokens=1024", "train.reference_world_size=1"]
    per_layer = {}
    for device in ("cpu", "cuda"):
        act = [pf.estimate_memory(load_recipe("baseline", sets + [f"model.num_layers={L}"]), 1, device).activations
               for L in (2, 3)]
        per_layer[device] = act[1] - act[0]
    # bf16 linears save half-size inputs, but the residual stream, the norms and the relu^2 square
    # stay fp32 and autocast adds bf16 copies: between half and nine tenths of the fp32 figure.
    assert 0.5 * per_layer["cpu"] < per_layer["cuda"] < 0.9 * per_layer["cpu"]


def test_terms_follow_the_optimizers_ema_ddp_and_priming():
    recipe = small("sidecar48", "train.reference_world_size=8", "train.batch_tokens=2048", "train.prime_steps=2")
    one, eight = pf.estimate_memory(recipe, 1, "cpu"), pf.estimate_memory(recipe, 8, "cpu")
    from pipeline.model import build_model

    with torch.device("meta"):
        model = build_model(recipe.model)
    groups = model.param_groups()
    nbytes = {route: sum(p.numel() * 4 for _, p in named) for route, named in groups.items()}
    n_adam = sum(len(named) for route, named in groups.items() if route != "matrix")
    total = sum(nbytes.values())
    assert one.parameters == one.gradients == total  # no buffers in this trunk
    assert one.ema == total and one.prime_snapshot == 2 * total
    # Muon momentum for every matrix on one rank; Adam's two moments and a 0-d step.
    assert one.optimizer_state == nbytes["matrix"] + 2 * (total - nbytes["matrix"]) + 4 * n_adam
    # Eight ranks: rank 0 keeps matrices 0, 8, 16, ...; DDP adds a bucket copy of the gradients.
    matrices = [p.numel() * 4 for _, p in groups["matrix"]]
    shares = [sum(matrices[r::8]) for r in range(8)]
    assert eight.optimizer_state == max(shares) + 2 * (total - nbytes["matrix"]) + 4 * n_adam
    assert eight.ddp_buckets == eight.gradients and one.ddp_buckets == 0
    assert (one.accum, eight.accum, one.local_seqs, eight.local_seqs) == (8, 1, 8, 8)


def test_micro_batch_divides_activations_not_state(one_thread):
    full = pf.estimate_memory(small("tiny", "train.batch_tokens=1024"), 1, "cpu")
    quarter = pf.estimate_memory(small("tiny", "train.batch_tokens=1024", "train.micro_batch_seqs=8"), 1, "cpu")
    assert (full.chunk_seqs, quarter.chunk_seqs) == (32, 8)
    assert full.static == quarter.static
    assert quarter.activations < 0.3 * full.activations


# ------------------------------------------------------------------- measured resident memory

_CHILD = r"""
import gc, json, re, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pipeline.config import Recipe, from_dict
from pipeline.distributed import DistInfo
from pipeline.stages.train import Trainer

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

recipe, warm = (from_dict(Recipe, json.loads(a)) for a in sys.argv[1:3])
paths, out = json.loads(sys.argv[3]), sys.argv[4]
cpu = DistInfo(0, 1, 0, torch.device("cpu"))
# One step of the same model on one sequence pages in torch's kernels first: a fixed cost of
# any torch process, not memory the recipe's size determines (RESERVE_BYTES covers it).
Trainer(warm, paths, out, cpu, log=lambda s: None).train_step()
gc.collect()
try:  # hand glibc's retained free chunks back, so that they do not hide growth from the baseline
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
before = status("VmRSS")
trainer = Trainer(recipe, paths, out, cpu, log=lambda s: None)
trainer.train_step()
print(json.dumps({"peak_growth": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_estimate_within_30_percent_of_measured_cpu_peak(tmp_path):
    """A fresh process builds the Trainer and runs one optimizer step; the measurement is the
    growth of its resident set's high-water mark over that: model, optimizer state, EMA,
    loader, the pass's activations, and what glibc's malloc keeps of freed tensors (128 KiB to
    32 MiB ones stay in its heap: the estimate does not count that, MARGIN does). A warm-up
    step on one sequence first pages in torch's kernels (~85 MiB, the same for any size).
    32k tokens per pass at width 32 make activations ~0.3 GiB, far above the rest."""
    from pipeline.config import to_dict
    from pipeline.data.shards import shard_name, write_shard

    recipe = small("tiny", "train.seq_len=64", "train.batch_tokens=32768")
    warm = small("tiny", "train.seq_len=64", "train.batch_tokens=64")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / shard_name("rand", "train", i)))
        write_shard(Path(paths[-1]), rng.integers(0, SMALL_VOCAB, 100_000))
    est = pf.estimate_memory(recipe, 1, "cpu")
    args = [json.dumps(to_dict(recipe)), json.dumps(to_dict(warm)), json.dumps(paths), str(tmp_path / "ckpt")]
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    print(f"measured peak growth {measured} B, estimate {est.total} B ({est.total / measured:.3f}); "
          f"activations {est.activations} B")
    assert est.activations > 0.8 * est.total  # the pass dominates, as intended
    assert abs(est.total / measured - 1) <= 0.30


# ---------------------------------------------------------------------------------- refusal


def test_preflight_refuses_what_does_not_fit_and_names_a_micro_batch_that_does(monkeypatch, one_thread):
    recipe = small("sidecar48", "train.seq_len=128", "train.batch_tokens=8192")  # 64 sequences per pass
    est = pf.estimate_memory(recipe, 1, "cpu")
    assert est.chunk_seqs == 64
    # Room, with the margin, for the state and 40% of the activations: passes of 16 sequences
    # (25%) fit, passes of 32 (50%) do not.
    avail = pf.AvailableMemory(int(pf.needed_bytes(est) - 0.6 * est.activations * (1 + pf.MARGIN["cpu"])),
                               "test machine")
    monkeypatch.setattr(pf, "available_memory", lambda device: avail)
    with pytest.raises(UserError) as e:
        pf.preflight(recipe, CPU)
    msg = str(e.value)
    assert f"predicted peak {pf.size(est.total)}" in msg and f"{pf.size(avail.bytes)} available (test machine)" in msg
    assert pf.smoke_command("sidecar48") in msg  # the README's CPU smoke command
    seqs = int(re.search(r"--set train\.micro_batch_seqs=(\d+)", msg).group(1))
    assert 1 <= seqs < 64 and 64 % seqs == 0
    assert seqs == 16  # the largest divisor of 64 that fits
    # With the fix applied, the same check lets the run through and says so.
    lines = []
    smaller = pf.preflight(pf.with_micro_batch(recipe, seqs), CPU, log=lines.append)
    assert smaller.chunk_seqs == seqs and pf.needed_bytes(smaller) <= avail.bytes
    assert f"--set train.micro_batch_seqs=16 (predicted {pf.size(smaller.total)}" in msg
    assert lines and lines[0].startswith(f"preflight: predicted peak {pf.size(smaller.total)}")


def test_preflight_says_when_nothing_fits_or_it_cannot_check(monkeypatch):
    recipe = small("tiny", "train.batch_tokens=512")
    monkeypatch.setattr(pf, "available_memory", lambda device: pf.AvailableMemory(2**20, "a 1 MiB machine"))
    with pytest.raises(UserError, match=r"no train.micro_batch_seqs fits") as e:
        pf.preflight(recipe, CPU)
    assert "1.0 MiB available (a 1 MiB machine)" in str(e.value)
    assert "shrink the recipe" in str(e.value)  # tiny has no README smoke command of its own
    monkeypatch.setattr(pf, "available_memory", lambda device: pf.AvailableMemory(None, "unknown here"))
    lines = []
    assert pf.preflight(recipe, CPU, log=lines.append).total > 0
    assert "not checked" in lines[0] and "unknown here" in lines[0]


def test_readme_smoke_command_fits_a_laptop():
    """The command the refusal proposes is the README's own, and it needs well under a GiB."""
    cmd = pf.smoke_command("sidecar48")
    assert cmd.startswith("pgolf run sidecar48 --set model.num_layers=5")
    words = shlex.split(cmd)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert "model.sidecar.layers=[2,3,4]" in sets and "train.seq_len=128" in sets
    est = pf.estimate_memory(load_recipe("sidecar48", sets), 1, "cpu")
    assert est.total < 0.5 * pf.GIB
    assert pf.smoke_command("no_such_recipe") is None


# ------------------------------------------------------------------------- available memory


def test_available_memory_reads_meminfo_cgroup_and_falls_back(monkeypatch):
    real = pf.available_memory(torch.device("cpu"))
    if Path("/proc/meminfo").exists():
        total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
        assert 0 < real.bytes <= total
    files = {"/proc/meminfo": "MemTotal: 8000000 kB\nMemAvailable:    4000000 kB\n",
             "/proc/self/cgroup": "0::/job\n",
             "/sys/fs/cgroup/job/memory.max": f"{3 * 2**30}\n",
             "/sys/fs/cgroup/job/memory.current": f"{2 * 2**30}\n",
             "/sys/fs/cgroup/job/memory.stat": f"anon 1\ninactive_file {2**29}\n"}
    monkeypatch.setattr(pf, "_read", lambda path: files.get(path))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # The container's limit (3 GiB - (2 GiB used - 0.5 GiB reclaimable)) is below MemAvailable.
    got = pf.available_memory(torch.device("cpu"))
    assert got.bytes == int(1.5 * 2**30) and "memory.max" in got.source
    files["/sys/fs/cgroup/job/memory.max"] = "max\n"
    meminfo = pf.AvailableMemory(4000000 * 1024, "MemAvailable in /proc/meminfo")
    assert pf.available_memory(torch.device("cpu")) == meminfo
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on one host share it
    assert pf.available_memory(torch.device("cpu")).bytes == 1000000 * 1024
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    files.clear()  # no /proc, no cgroup (macOS): the physical memory, an upper bound
    got = pf.available_memory(torch.device("cpu"))
    assert got.bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") and "upper bound" in got.source
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert pf.available_memory(torch.device("cpu")).bytes is None


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("loader", ["sequential", "coprime"])
def test_micro_batches_keep_the_trajectory(small_data, tmp_path, loader, one_thread):
    """8 sequences per rank per micro-step, 2 micro-steps: passes of 2 sequences give the same
    losses and weights up to float rounding; passes of 8 (= the whole micro-batch) bitwise."""
    def run(mbs: int):
        recipe = tiny_recipe(f"train.loader={loader}", "train.coprime.queue_depth=2", "train.reference_world_size=2",
                             "train.batch_tokens=512", f"train.micro_batch_seqs={mbs}")
        trainer = make_trainer(recipe, small_data, tmp_path / f"{loader}{mbs}")
        losses = [trainer.train_step()[0] for _ in range(3)]
        if hasattr(trainer.loader, "close"):
            trainer.loader.close()
        return trainer.chunk_seqs, losses, trainer.model.state_dict()

    (c0, l0, w0), (c2, l2, w2), (c8, l8, w8) = run(0), run(2), run(8)
    assert (c0, c2, c8) == (8, 2, 8)
    assert l2 == pytest.approx(l0, rel=1e-5) and l8 == l0
    for k, v in w0.items():
        assert torch.equal(v, w8[k])
        # Muon's Newton-Schulz iteration carries the gradients' rounding into the update, so the
        # weights agree to ~1e-5 of each tensor's scale after three steps.
        assert (v - w2[k]).abs().max() <= 1e-4 * v.abs().max() + 1e-7, f"{k} left the trajectory"


@pytest.mark.parametrize("bad", [-1, 3, 16])
def test_invalid_micro_batch_is_a_clear_error(small_data, tmp_path, bad):
    if bad < 0:  # the recipe loader refuses it already ...
        with pytest.raises(UserError, match=r"train\.micro_batch_seqs"):
            tiny_recipe(f"train.micro_batch_seqs={bad}")
    # ... and a recipe built in code meets the trainer's and the estimate's own check.
    recipe = pf.with_micro_batch(tiny_recipe(), bad)  # 8 sequences per micro-step
    for check in (lambda: make_trainer(recipe, small_data, tmp_path), lambda: pf.estimate_memory(recipe, 1, "cpu")):
        with pytest.raises(UserError) as e:
            check()
        assert f"train.micro_batch_seqs ({bad})" in str(e.value) and "[1, 2, 4, 8]" in str(e.value)


def test_micro_batches_under_ddp_keep_the_trajectory(small_data, tmp_path):
    """Two gloo ranks in passes of 2 sequences (DDP syncs only in the step's last backward)
    match one process with accumulation and whole micro-batches."""
    from test_distributed import SETS, _two_ranks

    single = make_trainer(tiny_recipe(*SETS), small_data, tmp_path / "single")
    single.run()
    split = _two_ranks(small_data, tmp_path / "two", extra=("train.micro_batch_seqs=2",))
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, split[k], atol=2e-5, rtol=1e-4), f"{k}: chunked DDP left the trajectory"


# ------------------------------------------------------------------------------------- check


def test_check_prints_the_memory_estimate(monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.setattr(pf, "available_memory", lambda device: pf.AvailableMemory(2**20, "test"))
    sets = [word for s in SMALL + ("model.num_layers=2",) for word in ("--set", s)]
    out = CliRunner().invoke(cli, ["check", "tiny", *sets])
    assert out.exit_code == 0, out.output
    lines = dict(line.split("=", 1) for line in out.output.splitlines() if line.startswith("memory_") and " " not in
                 line.split("=", 1)[0])
    est = pf.estimate_memory(small("tiny"), int(os.environ.get("WORLD_SIZE", "1")),
                             "cuda" if torch.cuda.is_available() else "cpu")
    assert int(lines["memory_estimate_bytes"]) == est.total
    assert int(lines["memory_estimate_activations_bytes"]) == est.activations
    assert lines["memory_available_bytes"] == f"{2**20} (test)"
    assert lines["memory_fits"] == "false" and lines["memory_fix"].startswith("none")
    assert math.isclose(float(lines["memory_activation_bytes_per_token"]), est.activation_bytes_per_token, abs_tol=1)
