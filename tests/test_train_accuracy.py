"""eval.train_tokens: the report sets training top-1 accuracy and bpb beside the held-out ones (what
a training-accuracy claim such as the TrueEvolving card's means), off the evaluation clock.

    .venv/bin/python -m pytest -q tests/test_train_accuracy.py
"""

from __future__ import annotations

import json
import math

from test_cli import cli_inprocess, sets


def test_training_accuracy_beside_held_out(small_data, tmp_path):
    proc = cli_inprocess("run", "tiny", "--data", str(small_data),
                         *sets("train.max_steps=40", "eval.train_tokens=512", "ttt.enabled=false"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = list((tmp_path / "artifacts").rglob("report.json"))
    report = json.loads(path.read_text())
    train = report["scores"]["train_slice"]
    assert train["token_count"] == 512 - 512 % 32  # the eval's truncation to whole windows
    assert report["train_top1_accuracy"] == train["top1_accuracy"] and 0 < train["top1_accuracy"] < 1
    assert report["val_top1_accuracy"] == report["scores"]["roundtrip"]["top1_accuracy"]
    nats = train["val_loss"] * train["token_count"]
    assert report["train_bpb"] == train["val_bpb"]
    assert abs(train["val_bpb"] - nats / (train["byte_count"] * math.log(2))) < 1e-9
    assert "train_slice_exact tokens=" in proc.stdout
    assert f"summary train_top1_accuracy={json.dumps(train['top1_accuracy'])}" in proc.stdout
    assert report["diagnostic_time_s"] >= train["eval_time_s"]  # counted as a diagnostic, not evaluation
