"""The training fast paths: how each option resolves per device, the CPU fallbacks they run on
here, deferred host syncs (same trajectory, the bad step still named), CPU worker threads, Muon's
multi-tensor step, and (with a GPU) the CUDA paths themselves.

    .venv/bin/python -m pytest -q tests/test_fast_path.py            # the GPU tests skip without CUDA
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import torch

from conftest import make_trainer, tiny_recipe
from pipeline.errors import NonFiniteLossError, UserError
from pipeline.model.gpt import UNetGPT
from pipeline.stages.fast_paths import resolve_fast_paths
from pipeline.stages.train import CHECKPOINT

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _losses(trainer) -> list:
    return [h["loss"] for h in trainer.history]


# ------------------------------------------------------------------------------- resolution


def test_auto_is_the_plain_path_on_the_cpu_and_the_fast_path_on_cuda():
    r = tiny_recipe("train.loader=coprime")
    cpu = resolve_fast_paths(r, CPU, 1, 1)
    assert (cpu.compile, cpu.autocast, cpu.attention_kernel, cpu.sync_every, cpu.muon_compile, cpu.copy_stream,
            cpu.cpu_workers) == (False, None, "auto", 1, False, False, 1)
    cuda = resolve_fast_paths(r, CUDA, 1, 1)  # resolution only: nothing runs on the device
    assert (cuda.compile, cuda.autocast, cuda.sync_every, cuda.muon_compile, cuda.copy_stream) == \
        (True, torch.bfloat16, r.train.log_every, True, True)
    assert "host_sync_every=4" in cuda.describe() and "autocast=bf16" in cuda.describe()
    forced = resolve_fast_paths(tiny_recipe("train.autocast=bf16", "train.host_sync_every=3",
                                            "optim.muon_compile=on"), CPU, 1, 1)
    assert (forced.autocast, forced.sync_every, forced.muon_compile) == (torch.bfloat16, 3, True)
    off = resolve_fast_paths(tiny_recipe("train.compile=off", "train.autocast=off", "train.loader=coprime",
                                         "train.coprime.copy_stream=off", "optim.muon_compile=off"), CUDA, 1, 1)
    assert (off.compile, off.autocast, off.copy_stream, off.muon_compile) == (False, None, False, False)


@pytest.mark.parametrize("sets, device, world, passes, fragment", [
    (("train.attention_kernel=efficient",), CPU, 1, 1, "is a CUDA kernel"),
    (("train.attention_kernel=cudnn",), CPU, 1, 1, "is a CUDA kernel"),
    (("train.attention_kernel=flash", "train.autocast=off"), CUDA, 1, 1, "needs bf16 inputs on CUDA"),
    (("train.loader=coprime", "train.coprime.copy_stream=on"), CPU, 1, 1, "copy_stream=on needs a CUDA device"),
    (("train.cpu_workers=2",), CUDA, 1, 4, "on CUDA leave it at 1"),
    (("train.cpu_workers=2",), CPU, 2, 4, "run one process"),
    (("train.cpu_workers=2", "train.compile=on"), CPU, 1, 4, "set train.compile=off"),
    (("train.cpu_workers=4",), CPU, 1, 2, "a step has 2 pass(es) to share"),
])
def test_impossible_combinations_are_user_errors(sets, device, world, passes, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve_fast_paths(tiny_recipe(*sets), device, world, passes)


def test_an_unknown_fast_path_value_fails_when_the_recipe_loads():
    with pytest.raises(UserError, match="train.autocast"):
        tiny_recipe("train.autocast=fp8")


# ------------------------------------------------------------------------------- CPU fallbacks


def test_cpu_attention_kernels_and_bf16_autocast_train(small_data, tmp_path, one_thread):
    runs = {}
    for name, extra in [("auto", ()), ("flash", ("train.attention_kernel=flash",)),
                        ("math", ("train.attention_kernel=math",)), ("bf16", ("train.autocast=bf16",))]:
        trainer = make_trainer(tiny_recipe("train.max_steps=3", *extra), small_data, tmp_path / name)
        runs[name] = trainer.run()
        assert trainer.fast.describe().count("=") == 7
    auto, flash, math_, bf16 = (_losses_of(runs[k]) for k in ("auto", "flash", "math", "bf16"))
    assert flash == auto  # the CPU's default kernel here is its flash kernel
    assert math_ == pytest.approx(auto, rel=1e-5)  # another kernel: the same to rounding
    assert bf16 == pytest.approx(auto, rel=2e-2) and bf16 != auto  # bf16 really ran


def _losses_of(result) -> list:
    return [h["loss"] for h in result.history]


def test_copy_stream_off_reads_the_same_batches_on_the_cpu(small_data, tmp_path):
    from pipeline.data.coprime_loader import CoprimeShardLoader
    from pipeline.data.shards import list_shards

    paths = list_shards(small_data, "train")
    a = CoprimeShardLoader(paths, 16, 4, cfg=tiny_recipe("train.coprime.copy_stream=off").train.coprime)
    b = CoprimeShardLoader(paths, 16, 4, cfg=tiny_recipe().train.coprime)
    try:
        for _ in range(3):
            (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    finally:
        a.close()
        b.close()
    with pytest.raises(UserError, match="copy_stream=on needs a CUDA device"):
        CoprimeShardLoader(paths, 16, 4, cfg=tiny_recipe("train.coprime.copy_stream=on").train.coprime)


# ------------------------------------------------------------------------------- host syncs


def test_deferred_host_syncs_keep_the_trajectory_bitwise(small_data, tmp_path, one_thread):
    every = make_trainer(tiny_recipe(), small_data, tmp_path / "every")
    every.run()
    deferred = make_trainer(tiny_recipe("train.host_sync_every=5"), small_data, tmp_path / "deferred")
    assert deferred.fast.sync_every == 5
    deferred.run()
    assert _losses(deferred) == _losses(every) and len(_losses(every)) == 12
    assert [h["step"] for h in deferred.history] == list(range(1, 13))
    for k, v in _weights(every).items():
        assert torch.equal(v, deferred.model.state_dict()[k]), k


def test_deferred_host_syncs_still_name_the_bad_step_and_keep_the_good_checkpoint(small_data, tmp_path,
                                                                                   monkeypatch):
    # sync points at steps 1, 4 (log/checkpoint), 8 and 12; the loss is poisoned from step 6 on:
    # it is read at step 8, and step 6 is named; the step-8 checkpoint is never written.
    original = UNetGPT.training_loss

    def poisoned(self, ids, targets, step=0):
        loss, aux = original(self, ids, targets, step)
        return (loss * float("nan") if step >= 5 else loss), aux

    monkeypatch.setattr(UNetGPT, "training_loss", poisoned)
    trainer = make_trainer(tiny_recipe("train.host_sync_every=100"), small_data, tmp_path)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.run()
    msg = str(e.value)
    assert "training loss became nan at step 6; stopped (read at step 8)" in msg
    assert "last good checkpoint (step 4)" in msg
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 4


def test_deferred_host_syncs_stop_at_the_signalled_step_and_resume_bitwise(small_data, tmp_path, one_thread):
    recipe = tiny_recipe("train.host_sync_every=100", "train.reference_world_size=2", "train.batch_tokens=512")
    full = make_trainer(recipe, small_data, tmp_path / "full")
    full.run()
    first = make_trainer(recipe, small_data, tmp_path / "resumed")
    real, calls = first.loader.next_batch, [0]

    def next_batch():
        calls[0] += 1
        if calls[0] == 2 * 5 + 2:  # inside step 6 (2 micro-steps per step)
            signal.raise_signal(signal.SIGINT)
        return real()

    first.loader.next_batch = next_batch
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["step"] == 6
    second = make_trainer(recipe, small_data, tmp_path / "resumed")
    assert second.run().resumed_from == 6
    assert _losses(second) == _losses(full)
    for k, v in _weights(full).items():
        assert torch.equal(v, second.model.state_dict()[k]), k


def test_validation_is_off_the_training_clock(small_data, tmp_path):
    trainer = make_trainer(tiny_recipe("train.max_steps=2", "train.val_every=1"), small_data, tmp_path)

    def slow_validate(model):
        time.sleep(1.0)
        return {"val_loss": 1.0}

    t0 = time.perf_counter()
    result = trainer.run(validate=slow_validate)
    wall = time.perf_counter() - t0
    assert [h.get("val_loss") for h in trainer.history] == [1.0, 1.0]
    assert result.train_time_s <= wall - 2.0 + 0.05


# ------------------------------------------------------------------------------- CPU workers


def test_cpu_workers_follow_the_same_trajectory_deterministically(small_data, tmp_path):
    sets = ("train.reference_world_size=4", "train.batch_tokens=512", "train.max_steps=4")
    plain = make_trainer(tiny_recipe(*sets), small_data, tmp_path / "plain")
    plain.run()
    a = make_trainer(tiny_recipe(*sets, "train.cpu_workers=2"), small_data, tmp_path / "a")
    b = make_trainer(tiny_recipe(*sets, "train.cpu_workers=2"), small_data, tmp_path / "b")
    threads = torch.get_num_threads()
    a.run()
    b.run()
    assert torch.get_num_threads() == threads  # restored after every step
    assert _losses(a) == _losses(b)  # fixed summation order: deterministic
    assert _losses(a) == pytest.approx(_losses(plain), rel=1e-5)
    for k, v in _weights(plain).items():
        assert torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]), k
        # Muon's Newton-Schulz carries the gradients' rounding into the update (as in
        # test_preflight's micro-batch test): the weights agree to ~1e-5 of each tensor's scale.
        assert (v - a.model.state_dict()[k]).abs().max() <= 1e-4 * v.abs().max() + 1e-7, k


def test_a_cpu_worker_error_reaches_the_caller(small_data, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_recipe("train.reference_world_size=2", "train.batch_tokens=512",
                                       "train.cpu_workers=2"), small_data, tmp_path)
    original = UNetGPT.training_loss

    def failing(self, ids, targets, step=0):
        import threading

        if threading.current_thread().name == "pgolf-cpu-worker-1":
            raise RuntimeError("boom in worker 1")
        return original(self, ids, targets, step)

    monkeypatch.setattr(UNetGPT, "training_loss", failing)
    with pytest.raises(RuntimeError, match="boom in worker 1"):
        trainer.train_step()


# ------------------------------------------------------------------------------- Muon


def test_muon_multi_tensor_step_equals_one_tensor_at_a_time():
    """The foreach step is the same arithmetic as the per-tensor loop (bitwise on the CPU)."""
    from pipeline.optim.muon import Muon, newton_schulz

    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4, 8), (6, 6)]
    p0 = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    ref, bufs = [p.clone() for p in p0], [torch.zeros_like(p) for p in p0]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            bufs[i].mul_(0.9).add_(g)
            d = g.add(bufs[i], alpha=0.9)
            u = newton_schulz(d) * max(1.0, d.size(0) / d.size(1)) ** 0.5
            ref[i].mul_(1.0 - 0.05 * 0.1)
            ref[i].add_(u, alpha=-0.05)
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r)


def test_muon_compile_option_routes_newton_schulz_through_torch_compile(monkeypatch):
    from pipeline.optim import muon as muon_mod

    compiled = []

    def fake_compile(fn, **kw):  # stands in for torch.compile: records and runs the function
        compiled.append(fn)
        return lambda *a, **k: fn(*a, **k)

    monkeypatch.setattr(muon_mod.torch, "compile", fake_compile)
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = muon_mod.Muon([p], lr=0.1, momentum=0.9, compile_ns=True)
    assert compiled == [muon_mod.newton_schulz] and opt.ns_compiled
    p.grad = torch.randn(4, 6)
    opt.step()
    assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_step_does_not_synchronise_the_host(small_data, tmp_path):
    """No host sync inside a step with the full CUDA fast path (torch's sync debug mode raises on
    one), and the first steps compile (model and Newton-Schulz) and train."""
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    recipe = tiny_recipe("train.loader=coprime", "train.coprime.queue_depth=2", "train.attention_kernel=flash")
    trainer = Trainer(recipe, list_shards(small_data, "train"), tmp_path, init("cuda"), log=lambda s: None)
    assert trainer.fast.compile and trainer.fast.copy_stream and trainer.fast.autocast == torch.bfloat16
    first = [trainer.train_step() for _ in range(3)]  # compiles (and may sync while doing so)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss_sum, grad_norm = trainer.step_on_device()
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss_sum) and torch.isfinite(grad_norm)
    assert float(loss_sum) / trainer.passes_per_step < first[0][0]
    trainer.loader.close()


@pytest.mark.gpu
def test_cuda_flash_gqa_matches_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(flash.float(), math_, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_copy_stream_serves_the_same_batches_as_a_plain_copy(small_data):
    from pipeline.data.coprime_loader import CoprimeShardLoader
    from pipeline.data.shards import list_shards

    paths = list_shards(small_data, "train")
    on = CoprimeShardLoader(paths, 16, 4, cfg=tiny_recipe("train.coprime.copy_stream=on").train.coprime,
                            device="cuda")
    off = CoprimeShardLoader(paths, 16, 4, cfg=tiny_recipe("train.coprime.copy_stream=off").train.coprime,
                             device="cuda")
    try:
        for _ in range(4):
            (xa, ya), (xb, yb) = on.next_batch(), off.next_batch()
            assert xa.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)
    finally:
        on.close()
        off.close()


@pytest.mark.gpu
def test_cuda_bf16_compiled_run_tracks_the_fp32_eager_run(small_data, tmp_path):
    fast = make_cuda_trainer(tiny_recipe("train.max_steps=8"), small_data, tmp_path / "fast")
    plain = make_cuda_trainer(tiny_recipe("train.max_steps=8", "train.compile=off", "train.autocast=off",
                                          "optim.muon_compile=off", "train.host_sync_every=1"),
                              small_data, tmp_path / "plain")
    fast.run()
    plain.run()
    assert _losses(fast) == pytest.approx(_losses(plain), rel=3e-2)
    assert _losses(fast)[-1] < _losses(fast)[0]


def make_cuda_trainer(recipe, data, out):
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    return Trainer(recipe, list_shards(data, "train"), out, init("cuda"), log=lambda s: None)
