"""Golden run: the tiny recipe's per-step training losses, its blob's sha256 and its final val_bpb,
pinned on a corpus this test writes itself (torchtitan pins golden losses the same way).

A change that moves any of them must say why in its commit, and re-record the fixture with

    PGOLF_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

Bitwise equality needs the same floating-point kernels: the fixture records a fingerprint of
this machine's CPU numerics (a few matmuls, softmax and reductions, one thread). On a machine
whose fingerprint differs, the losses and val_bpb are held to a tight tolerance instead and the
blob's sha256 (which hashes every bit of the weights) is not compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

from test_cli import cli_inprocess

FIXTURE = Path(__file__).parent / "golden" / "tiny.json"
GOLDEN_SETS = (
    "train.max_steps=6", "train.warmdown_steps=3", "train.log_every=1", "train.checkpoint_every=0",
    "train.max_wallclock_s=0", "model.vocab_size=512",
)


def golden_corpus(n_lines: int = 4000) -> str:
    """~190 KB of deterministic pseudo-English: words built from syllables, Zipf-like frequencies."""
    rng = random.Random(20260318)
    syllables = ["ka", "lo", "mi", "ren", "sto", "va", "qui", "der", "ath", "el", "or", "un", "bri", "tes", "no"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 11)
        line = " ".join(rng.choices(words, weights, k=n)).capitalize()
        lines.append(line + rng.choice([".", ".", ",", "?", "!"]))
    return "\n".join(lines) + "\n"


def numerics_fingerprint() -> str:
    """sha256 of a few float32 kernels the training step uses, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 200, generator=g), torch.randn(200, 96, generator=g)
        outs = [a @ b, torch.softmax(a, dim=-1), torch.nn.functional.rms_norm(a, (200,)), (a @ b).sum(0),
                torch.nn.functional.scaled_dot_product_attention(a.view(1, 1, 64, 200), a.view(1, 1, 64, 200),
                                                                 a.view(1, 1, 64, 200), is_causal=True)]
        h = hashlib.sha256()
        for o in outs:
            h.update(o.contiguous().numpy().tobytes())
        return f"{torch.__version__}:{h.hexdigest()[:16]}"
    finally:
        torch.set_num_threads(threads)


def _collect(out_root: Path) -> dict:
    """The pinned figures of one finished run under `out_root`."""
    (report_path,) = list(out_root.rglob("report.json"))
    report = json.loads(report_path.read_text())
    (blob,) = list(out_root.rglob("model.bin"))
    (train_manifest,) = [p for p in out_root.rglob("manifest.json") if p.parent.name == "train"]
    history = json.loads(train_manifest.read_text())["outputs"]["history"]
    return {"losses": [h["loss"] for h in history], "blob_sha256": hashlib.sha256(blob.read_bytes()).hexdigest(),
            "val_bpb": report["val_bpb"]}


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    from pipeline.data.prepare import prepare_text

    root = tmp_path_factory.mktemp("golden")
    text = root / "golden.txt"
    text.write_text(golden_corpus())
    prepare_text(text, root / "data", vocab_size=512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["run", "tiny", "--data", str(root / "data"), "--out", str(root / "artifacts"), "--device", "cpu"]
        for s in GOLDEN_SETS:
            args += ["--set", s]
        proc = cli_inprocess(*args, cwd=root)
    finally:
        torch.set_num_threads(threads)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return _collect(root / "artifacts")


def test_golden_tiny_run(golden_run):
    fingerprint = numerics_fingerprint()
    if os.environ.get("PGOLF_UPDATE_GOLDEN"):
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps({"numerics": fingerprint, "sets": list(GOLDEN_SETS), **golden_run},
                                      indent=2) + "\n")
    golden = json.loads(FIXTURE.read_text())
    assert golden["sets"] == list(GOLDEN_SETS)
    assert len(golden_run["losses"]) == len(golden["losses"]) == 6
    if golden["numerics"] == fingerprint:  # same kernels: every bit
        assert golden_run["losses"] == golden["losses"]
        assert golden_run["blob_sha256"] == golden["blob_sha256"]
        assert golden_run["val_bpb"] == golden["val_bpb"]
    else:  # other kernels (another CPU or torch build): same trajectory to rounding
        assert golden_run["losses"] == pytest.approx(golden["losses"], rel=1e-4)
        assert golden_run["val_bpb"] == pytest.approx(golden["val_bpb"], rel=1e-4)
