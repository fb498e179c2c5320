"""The generated train_gpt.py is self-contained: it runs the whole pipeline with only torch,
numpy, sentencepiece and zstandard importable, and its size is the reported bytes_code.

    .venv/bin/python -m pytest -q tests/test_codegen.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import tiny_recipe
from pipeline.codegen import generated_code_bytes, runtime_modules, write_train_gpt
from pipeline.recipe import load_recipe

BLOCKED = ("click", "pydantic", "yaml", "safetensors", "tqdm", "matplotlib", "huggingface_hub", "tiktoken")

def filtered_site_packages(dest):
    """A copy (by symlink) of this interpreter's site-packages without the disallowed packages
    and without pgolf's own editable install: the submission must run in exactly that."""
    import sysconfig

    src = sysconfig.get_paths()["purelib"]
    dest.mkdir()
    for entry in os.listdir(src):
        top = entry.split("-")[0].split(".")[0].lower()
        if top in BLOCKED or top in ("pydantic_core", "_yaml", "mpl_toolkits", "pgolf") \
                or "editable" in entry.lower() or entry.endswith(".pth"):
            continue
        os.symlink(os.path.join(src, entry), dest / entry)
    return dest


# unet_gpt ships without recurrent.py; depth_recurrent ships without gpt.py: both must still run.
TRUNKS = {"unet_gpt": (), "depth_recurrent": ("model.trunk=depth_recurrent", "model.recurrent.k_rank=4",
                                              "model.recurrent.td_rank=4", "model.recurrent.gru_rank=4")}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_generated_script_runs_with_only_the_allowed_packages(small_data, tmp_path, trunk):
    recipe = tiny_recipe("train.max_steps=3", "ttt.enabled=true", *TRUNKS[trunk])
    script = tmp_path / "records" / "train_gpt.py"
    script.parent.mkdir()
    nbytes = write_train_gpt(recipe, script)
    assert nbytes == script.stat().st_size == generated_code_bytes(recipe)
    site_dir = filtered_site_packages(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(site_dir), DATA_PATH=str(small_data), OUT_DIR=str(tmp_path / "out"),
               SEED="7", PYTHONNOUSERSITE="1")
    # -S: no site processing, so only the filtered packages and the script's own zip exist.
    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % ((*BLOCKED, "pipeline"),)
    seen = subprocess.run([sys.executable, "-S", "-c", probe], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=60)
    assert seen.stdout.strip() == "[]", seen.stdout + seen.stderr  # the environment really lacks them
    proc = subprocess.run([sys.executable, "-S", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    assert f"Code size: {nbytes} bytes" in out
    blob = tmp_path / "out" / "final_model.bin"
    m = re.search(r"Serialized model \S+: (\d+) bytes", out)
    assert int(m.group(1)) == blob.stat().st_size
    assert "seed=7" in out  # SEED from the environment
    final = re.search(r"final_exact val_loss=(\d+\.\d+) val_bpb=(\d+\.\d+)", out)
    assert final and 0.5 < float(final.group(2)) < 20
    assert "ttt_exact mode=score_first" in out


def test_code_bytes_count_the_embedded_recipe():
    a = tiny_recipe()
    b = tiny_recipe("model.num_layers=12")  # one more digit in the embedded recipe JSON
    assert generated_code_bytes(b) == generated_code_bytes(a) + 1
    assert 20_000 < generated_code_bytes(a) < 200_000


def test_the_script_carries_only_the_parts_its_recipe_uses():
    sidecar = set(runtime_modules(load_recipe("sidecar48")))
    recurrent = set(runtime_modules(load_recipe("depth_recurrent")))
    assert {"pipeline/model/gpt.py", "pipeline/model/parts/sidecar.py", "pipeline/submission.py",
            "pipeline/stages/train.py", "eval/scorer.py", "pipeline/model/parts/__init__.py"} <= sidecar
    assert not any("recurrent" in m for m in sidecar)
    seed_parts = {"pipeline/model/parts/true_evolving.py", "pipeline/model/parts/elita.py",
                  "pipeline/model/parts/orthopar.py", "pipeline/model/parts/normalizers.py"}
    assert not seed_parts & sidecar
    assert "pipeline/model/parts/true_evolving.py" in runtime_modules(load_recipe("true_evolving"))
    assert "pipeline/model/parts/normalizers.py" in runtime_modules(load_recipe("shiftmax_mix"))
    assert {"pipeline/model/recurrent.py", "pipeline/model/recurrent_parts.py"} <= recurrent
    assert "pipeline/model/gpt.py" not in recurrent
    # nothing the submission may not import: the CLI, recipe loading, packaging and plots stay out
    assert not {"pipeline/cli.py", "pipeline/recipe.py", "pipeline/stages/package.py", "pipeline/report.py"} & sidecar
