"""Shared fixtures: a small prepared data directory and shrunken recipes for fast CPU tests.

Run the suite with `make test` (or `.venv/bin/python -m pytest -q`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINYSHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
SMALL_VOCAB = 320

# The recipe overrides that make any unet_gpt recipe a few-second CPU run on `small_data`.
TINY_SETS = (
    f"model.vocab_size={SMALL_VOCAB}", "model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
    "model.num_kv_heads=1", "train.seq_len=32", "train.batch_tokens=256", "train.reference_world_size=1",
    "train.max_steps=12", "train.warmdown_steps=4", "train.log_every=4", "train.checkpoint_every=4",
    "train.max_wallclock_s=0", "eval.seq_len=32", "eval.stride=16", "eval.batch_seqs=32",
    "ttt.chunk_tokens=512", "data.max_val_tokens=2048",
)


@pytest.fixture(autouse=True, scope="session")
def _default_sigint():
    """Python's own Ctrl-C handler for the whole session. A suite started in the background of a
    non-interactive shell (`nohup make test &`) inherits SIGINT ignored, and the interruption tests
    would then test the shell's setting instead of pgolf's handling."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """pgolf's cache (file hashes, the embedded corpus) in a temporary folder, never the checkout's."""
    import os

    old = os.environ.get("PGOLF_CACHE")
    os.environ["PGOLF_CACHE"] = str(tmp_path_factory.mktemp("pgolf_cache"))
    yield
    if old is None:
        os.environ.pop("PGOLF_CACHE", None)
    else:
        os.environ["PGOLF_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    no_gpu = torch.cuda.device_count() == 0
    for item in items:
        if "gpu" in item.keywords and no_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module of tiny tensors: intra-op threads only add contention
    there (on a loaded 2-core machine, 10-100x slower element-wise ops). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_text() -> str:
    """~60 KB of English prose: tinyshakespeare's head where the shared folder exists, else
    a deterministic synthetic text (the suite must not depend on the shared folder)."""
    if TINYSHAKESPEARE.exists():
        return TINYSHAKESPEARE.read_text()[:60_000]
    import random

    rng = random.Random(0)
    words = "the king and queen of this realm shall speak to thee now my lord good night".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(1500)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare_text

    root = tmp_path_factory.mktemp("small_data")
    src = root / "small.txt"
    src.write_text(small_text())
    out = root / "prepared"
    prepare_text(src, out, vocab_size=SMALL_VOCAB)
    return out


def tiny_recipe(*extra: str, name: str = "tiny", seed: int | None = None):
    from pipeline.recipe import load_recipe

    return load_recipe(name, list(TINY_SETS) + list(extra), seed)


def make_trainer(recipe, data, out, progress=None):
    """A CPU Trainer on `data`'s training shards that logs nowhere."""
    from pipeline.data.shards import list_shards
    from pipeline.distributed import init
    from pipeline.stages.train import Trainer

    return Trainer(recipe, list_shards(data, "train"), out, init("cpu"), log=lambda s: None, progress=progress)


def interrupt_at(step_to_stop: int):
    """A progress callback that sends this process SIGINT (Ctrl-C) once `step_to_stop` is reached;
    the trainer stops at the next step boundary and raises KeyboardInterrupt."""
    import signal

    def progress(step, total, rec):
        if step == step_to_stop:
            signal.raise_signal(signal.SIGINT)

    return progress
