"""`pgolf reproduce`: a published entry's figures beside ours, per seed and on average.

    .venv/bin/python -m pytest -q tests/test_reproduce.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.reproduce import load_published
from test_cli import cli_inprocess, sets

TINY = (Path(__file__).parents[1] / "recipes" / "tiny.yaml").as_posix()


def _recipe(tmp_path, published: str) -> Path:
    path = tmp_path / "entry.yaml"
    path.write_text(f"extends: {TINY}\nname: entry\n{published}")
    return path


def test_figures_are_set_beside_ours_per_seed_and_on_average(small_data, tmp_path):
    recipe = _recipe(tmp_path, """published:
  source: a test's own numbers
  figures:
    - {name: score, ours: val_bpb, note: "theirs made up", per_seed: {1: 2.5, 2: 3.0}}
    - {name: steps, ours: steps, per_seed: {1: 10}}
""")
    proc = cli_inprocess("reproduce", str(recipe), "--seeds", "1,2", "--data", str(small_data),
                         *sets("train.max_steps=3"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reports = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in (tmp_path / "artifacts").rglob("report.json")}
    assert sorted(reports) == [1, 2]
    for seed, theirs in ((1, 2.5), (2, 3.0)):
        ours = reports[seed]["val_bpb"]
        line = (f"reproduce figure=score seed={seed} theirs={theirs:.8g} ours(val_bpb)={ours:.8g} "
                f"diff={ours - theirs:+.6g}")
        assert line in proc.stdout.splitlines()
    mean = (reports[1]["val_bpb"] + reports[2]["val_bpb"]) / 2
    assert re.search(rf"figure=score seeds=2 mean_theirs=2.75 mean_ours={mean:.8g} .*\(theirs made up\)", proc.stdout)
    assert "figure=steps seed=2 theirs=n/a" in proc.stdout and "figure=steps seed=1 theirs=10 ours(steps)=3 diff=-7" \
        in proc.stdout
    assert not (tmp_path / "records").exists()


def test_a_recipe_without_published_figures_is_refused(tmp_path):
    proc = cli_inprocess("reproduce", "tiny", cwd=tmp_path)
    assert proc.returncode == 2 and "carries no published figures" in proc.stderr


def test_published_sections_are_validated_and_not_run_settings(tmp_path):
    assert load_published("sidecar48").seeds == [13, 1111, 1337]
    assert load_published("depth_recurrent").figures[0].per_seed == {1337: 1.2271}
    bad_key = "published: {source: x, figures: [{name: a, ours: nope, per_seed: {}}]}\n"
    with pytest.raises(UserError, match="report.json does not have"):
        load_published(str(_recipe(tmp_path, bad_key)))
    bad_value = "published: {source: x, figures: [{name: a, ours: steps, per_seed: 3}]}\n"
    with pytest.raises(UserError, match="published.figures.0.per_seed"):
        load_published(str(_recipe(tmp_path, bad_value)))
