"""No cached result or checkpoint survives a change of what produced it (issue: trust the inputs).

Each test below failed on the code before content keys: a run on new data resumed the old data's
checkpoint and wrote the same folder; a tokenizer swapped into a prepared directory was accepted;
a checkpoint written by other code was resumed.

    .venv/bin/python -m pytest -q tests/test_provenance.py
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SMALL_VOCAB, interrupt_at, tiny_recipe
from pipeline.data.identity import CHALLENGE_TOKENIZERS, published_export_problem
from pipeline.distributed import init
from pipeline.errors import UserError
from pipeline.provenance import FileHashCache, data_identity, safe_join
from test_cli import cli_inprocess, sets


def _text(seed: int) -> str:
    rng = random.Random(seed)
    words = "the king and queen of this realm shall speak to thee now my lord good night sir lady".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(1400)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two prepared directories of the same shape (same sizes) from different texts."""
    from pipeline.data.prepare import prepare_text

    root = tmp_path_factory.mktemp("two")
    out = []
    for name, seed in (("alpha", 1), ("beta", 2)):
        src = root / f"{name}.txt"
        src.write_text(_text(seed))
        prepare_text(src, root / name, vocab_size=SMALL_VOCAB)
        out.append(root / name)
    return out


def test_a_run_on_new_data_never_resumes_the_old_datas_checkpoint(two_datasets, tmp_path):
    alpha, beta = two_datasets
    first = cli_inprocess("run", "tiny", "--data", str(alpha), *sets("train.max_steps=6"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli_inprocess("run", "tiny", "--data", str(beta), *sets("train.max_steps=6"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    folders = sorted(p.parent.name for p in (tmp_path / "artifacts" / "tiny").glob("*/seed1337"))
    assert len(folders) == 2 and folders[0].startswith("alpha-") and folders[1].startswith("beta-")
    assert "resume step=" not in second.stdout and "skip stage=" not in second.stdout
    assert "step=6/6 loss=" in second.stdout  # every step ran on the new data
    reports = [json.loads((tmp_path / "artifacts" / "tiny" / f / "seed1337" / "report.json").read_text())
               for f in folders]
    assert reports[0]["val_sha256"] != reports[1]["val_sha256"]
    assert reports[0]["provenance"]["data"]["train"] != reports[1]["provenance"]["data"]["train"]
    # the first run's folder is intact and reusable: a third run reuses every cached stage
    third = cli_inprocess("run", "tiny", "--data", str(alpha), *sets("train.max_steps=6"), cwd=tmp_path)
    assert third.returncode == 0
    for stage in ("train", "export", "score"):
        assert f"skip stage={stage}" in third.stdout
    assert third.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]


def test_a_swapped_tokenizer_is_refused_naming_both_hashes(two_datasets, tmp_path):
    alpha, beta = two_datasets
    mixed = tmp_path / "mixed"
    shutil.copytree(alpha, mixed)
    shutil.copyfile(beta / "tokenizer.model", mixed / "tokenizer.model")
    proc = cli_inprocess("run", "tiny", "--data", str(mixed), *sets(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    meta = json.loads((alpha / "meta.json").read_text())
    assert "meta.json records tokenizer_sha256=" + meta["tokenizer_sha256"] in proc.stderr
    from pipeline.fileio import file_sha256

    assert file_sha256(beta / "tokenizer.model") in proc.stderr and "pgolf data prepare" in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_a_removed_shard_or_changed_count_is_refused(two_datasets, tmp_path):
    alpha, _ = two_datasets
    d = tmp_path / "d"
    shutil.copytree(alpha, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["val_tokens"] += 1
    (d / "meta.json").write_text(json.dumps(meta))
    proc = cli_inprocess("run", "tiny", "--data", str(d), *sets(), cwd=tmp_path)
    assert proc.returncode == 2 and f"records val_tokens={meta['val_tokens']}" in proc.stderr


def test_a_checkpoint_from_other_code_is_not_resumed(two_datasets, tmp_path, monkeypatch):
    import pipeline.run as run_mod
    from pipeline.stages.train import CHECKPOINT

    alpha, _ = two_datasets
    recipe = tiny_recipe("train.max_steps=8", "train.checkpoint_every=4")
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_recipe(recipe, alpha, tmp_path, init("cpu"), echo=lines.append,
                           progress_factory=lambda total: _Interrupt(6))
    (ckpt,) = list(tmp_path.rglob(CHECKPOINT))
    assert torch.load(ckpt, weights_only=False)["step"] == 6
    real = run_mod.code_identity
    monkeypatch.setattr(run_mod, "code_identity", lambda r: real(r) | {"runtime_sha256": "0" * 64})
    lines.clear()
    run_mod.run_recipe(recipe, alpha, tmp_path, init("cpu"), echo=lines.append)
    text = "\n".join(lines)
    assert "was written for a different code; starting fresh" in text and "resume step=" not in text
    assert (ckpt.parent / "ckpt.stale.pt").exists()


class _Interrupt:
    """A progress bar stand-in that sends SIGINT at one step (Ctrl-C)."""

    def __init__(self, step: int):
        self.callback = interrupt_at(step)

    def __call__(self, step, total, rec):
        self.callback(step, total, rec)

    def close(self):
        pass


def test_file_hashes_are_cached_by_path_size_and_mtime(two_datasets, tmp_path):
    alpha, _ = two_datasets
    d = tmp_path / "d"
    shutil.copytree(alpha, d)
    cache = FileHashCache(tmp_path / "hashes.json")
    first = data_identity(d, d / "tokenizer.model", cache)
    reloaded = FileHashCache(tmp_path / "hashes.json")
    assert reloaded.entries == cache.entries and data_identity(d, d / "tokenizer.model", reloaded) == first
    # a changed shard (same size, new mtime) is hashed again and changes the identity
    shard = sorted(d.glob("*_train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-2:] = (int.from_bytes(raw[-2:], "little") ^ 1).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    changed = data_identity(d, d / "tokenizer.model", reloaded)
    assert changed["train"] != first["train"] and changed["val"] == first["val"] and changed["tag"] != first["tag"]


def test_known_challenge_validation_counts():
    sp1024 = next(sha for sha, (name, _) in CHALLENGE_TOKENIZERS.items() if name == "sp1024")
    shards = [Path("fineweb_train_000000.bin")]
    assert published_export_problem(shards, sp1024, 62_021_632 + 1 + 700, 2048) is None  # within truncation
    problem = published_export_problem(shards, sp1024, 50_000_000, 1024)
    assert problem and "62,021,632" in problem and "50,000,000" in problem
    assert published_export_problem([Path("data_train_000000.bin")], sp1024, 50_000_000, 1024) is None
    assert published_export_problem(shards, "f" * 64, 50_000_000, 1024) is None


def test_safe_join_refuses_escapes(tmp_path):
    assert safe_join(tmp_path, "tiny", "seed1") == (tmp_path / "tiny" / "seed1").resolve()
    for bad in ("../x", "a/../../x", "/etc"):
        with pytest.raises(UserError, match="outside"):
            safe_join(tmp_path, bad, "seed1")
