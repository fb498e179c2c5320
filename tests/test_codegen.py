"""The generated train_gpt.py is self-contained: it runs the whole pipeline with only torch,
numpy, sentencepiece and zstandard importable (plus brotli when that codec was chosen), its size
is the reported bytes_code, and its minified, compressed code is the repository's code.

    .venv/bin/python -m pytest -q tests/test_codegen.py
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import tiny_recipe
from hypothesis import given
from hypothesis import strategies as st

from pipeline.codegen import (
    ROOT,
    b93decode,
    b93encode,
    build_train_gpt,
    generated_code_bytes,
    minify_module,
    render_train_gpt,
    runtime_modules,
    shipped_sources,
    unpack_train_gpt,
    write_train_gpt,
)
from pipeline.config import to_dict
from pipeline.recipe import load_recipe

BLOCKED = ("click", "pydantic", "yaml", "safetensors", "tqdm", "matplotlib", "huggingface_hub", "tiktoken")

def filtered_site_packages(dest, also_blocked=()):
    """A copy (by symlink) of this interpreter's site-packages without the disallowed packages
    and without pgolf's own editable install: the submission must run in exactly that."""
    import sysconfig

    src = sysconfig.get_paths()["purelib"]
    dest.mkdir()
    for entry in os.listdir(src):
        top = entry.split("-")[0].split(".")[0].lower()
        if top in BLOCKED or top.lstrip("_") in also_blocked \
                or top in ("pydantic_core", "_yaml", "mpl_toolkits", "pgolf") \
                or "editable" in entry.lower() or entry.endswith(".pth"):
            continue
        os.symlink(os.path.join(src, entry), dest / entry)
    return dest


# unet_gpt ships without recurrent.py; depth_recurrent ships without gpt.py: both must still run.
# The first ships in the codec "auto" picks, the second is forced to LZMA and runs without brotli.
CASES = {"unet_gpt": ("auto", ()),
         "depth_recurrent": ("lzma", ("model.trunk=depth_recurrent", "model.recurrent.k_rank=4",
                                      "model.recurrent.td_rank=4", "model.recurrent.gru_rank=4"))}


@pytest.mark.parametrize("trunk", sorted(CASES))
def test_generated_script_runs_with_only_the_allowed_packages(small_data, tmp_path, trunk):
    codec, sets = CASES[trunk]
    recipe = tiny_recipe("train.max_steps=3", "ttt.enabled=true", f"package.code_codec={codec}", *sets)
    script = tmp_path / "records" / "train_gpt.py"
    script.parent.mkdir()
    nbytes = write_train_gpt(recipe, script)
    built = build_train_gpt(recipe)
    assert nbytes == script.stat().st_size == generated_code_bytes(recipe) == built.nbytes
    if codec == "lzma":
        assert built.codec == "lzma" and "brotli" not in script.read_text()
    assert re.search(rf"^import .*,{built.codec}$", script.read_text(), re.MULTILINE)
    blocked = ("brotli",) if built.codec == "lzma" else ()
    site_dir = filtered_site_packages(tmp_path / "site", blocked)
    env = dict(os.environ, PYTHONPATH=str(site_dir), DATA_PATH=str(small_data), OUT_DIR=str(tmp_path / "out"),
               SEED="7", PYTHONNOUSERSITE="1")
    # -S: no site processing, so only the filtered packages and the script's own modules exist.
    probe = f"import importlib.util as u; print([m for m in {(*BLOCKED, *blocked, 'pipeline')!r} if u.find_spec(m)])"
    seen = subprocess.run([sys.executable, "-S", "-c", probe], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert seen.stdout.strip() == "[]", seen.stdout + seen.stderr  # the environment really lacks them
    proc = subprocess.run([sys.executable, "-S", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    assert f"Code size: {nbytes} bytes" in out
    blob = tmp_path / "out" / "final_model.bin"
    m = re.search(r"Serialized model \S+: (\d+) bytes", out)
    assert int(m.group(1)) == blob.stat().st_size
    assert "seed=7" in out  # SEED from the environment
    final = re.search(r"^final val_bpb=(\d+\.\d+) bytes_total=(\d+)$", out, re.MULTILINE)
    assert final and 0.5 < float(final.group(1)) < 20
    assert int(final.group(2)) == blob.stat().st_size + nbytes
    assert "ttt_exact mode=score_first" in out


def test_the_script_carries_the_minified_modules_and_the_recipe():
    recipe = tiny_recipe("model.num_layers=12")
    built = build_train_gpt(recipe)
    files, recipe_json = unpack_train_gpt(built.text)
    assert sorted(files) == runtime_modules(recipe)
    shipped = shipped_sources(recipe)  # the modules less what nothing in the bundle reaches (pipeline.dead_code)
    assert all(files[rel] == minify_module(shipped[rel]) for rel in files)
    assert json.loads(recipe_json) == json.loads(json.dumps(to_dict(recipe)))
    assert json.loads(recipe_json)["model"]["num_layers"] == 12
    assert built.source_bytes == sum((ROOT / rel).stat().st_size for rel in files)
    assert built.minified_bytes == sum(len(p) + len(s.encode()) + 2 for p, s in files.items()) + len(recipe_json)
    assert built.minified_bytes < 0.6 * built.source_bytes  # docstrings and comments are gone
    assert built.nbytes < 0.2 * built.source_bytes
    # a plain printable-ASCII file (base-93, no control characters), so it survives editors and diffs
    assert all(c == "\n" or " " <= c <= "~" for c in built.text)
    other = build_train_gpt(tiny_recipe())  # another recipe: same code, another embedded recipe
    assert other.text != built.text and unpack_train_gpt(other.text)[0] == files


def test_auto_ships_the_smaller_codec_and_lzma_can_be_forced():
    from pipeline.codegen import _payload, _render

    recipe = tiny_recipe()
    payload, _ = _payload(recipe)
    sizes = {c: len(_render(recipe, c, payload)) for c in ("brotli", "lzma")}
    auto = build_train_gpt(recipe)
    assert auto.nbytes == min(sizes.values()) and sizes[auto.codec] == auto.nbytes
    assert f"{auto.codec}.decompress(" in auto.text and ({"brotli", "lzma"} - {auto.codec}).pop() not in auto.text
    forced = build_train_gpt(tiny_recipe("package.code_codec=lzma"))
    assert forced.codec == "lzma" and "brotli" not in forced.text
    assert unpack_train_gpt(forced.text)[0] == unpack_train_gpt(auto.text)[0]


@given(st.binary(max_size=300))
def test_base93_round_trips_any_bytes(data):
    text = b93encode(data)
    assert len(text) % 13 == 0 and len(text) <= 13 * -(-(8 * len(data)) // 85)
    assert '"' not in text and "\\" not in text and all(" " <= c <= "~" for c in text)
    assert b93decode(text, len(data)) == data


def test_base93_digits_are_the_ones_the_script_decodes():
    # the digits are printable ASCII without `"` and `\\`, in order; the script maps a character
    # code c back to its digit as c-32-(c>34)-(c>92)
    alphabet = [c for c in range(32, 127) if chr(c) not in '"\\']
    assert len(alphabet) == 93
    assert [c - 32 - (c > 34) - (c > 92) for c in alphabet] == list(range(93))
    assert 93 ** 13 >= 2 ** 85  # 13 digits hold a block of 85 bits
    data = bytes([0, 1, 254, 255, 7])
    text = b93encode(data)
    value = 0
    for ch in text:
        value = value * 93 + alphabet.index(ord(ch))
    assert value == int.from_bytes(data, "big") << (85 - 40)  # one zero-padded block
    assert b93encode(b"\x00") == " " * 13


def _bindings(tree: ast.Module) -> tuple[set[str], dict[str, list[str]]]:
    """Module-level names a module binds, and each class's annotated (dataclass) fields."""
    names, fields = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            fields[node.name] = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign) or isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value:
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names, fields


def test_every_minified_module_compiles_and_keeps_its_names():
    """What other modules import, dataclass fields, argument names and literals survive minifying."""
    modules = sorted({rel for r in sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
                      for rel in runtime_modules(load_recipe(r))})
    assert len(modules) > 30
    for rel in modules:
        source = (ROOT / rel).read_text()
        small = minify_module(source)
        compile(small, rel, "exec")
        before, after = ast.parse(source), ast.parse(small)
        assert _bindings(after) == _bindings(before), rel
        # locals and arguments are not renamed: every identifier and keyword of the minified code is in the original
        def words(t):
            return {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} | \
                {n.arg for n in ast.walk(t) if isinstance(n, (ast.arg, ast.keyword)) and n.arg}

        assert words(after) <= words(before), (rel, words(after) - words(before))
        scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [n for n in ast.walk(after) if isinstance(n, scopes) and ast.get_docstring(n) is not None]
        assert not docs, rel
        assert len(small) < len(source) or len(source) < 200, rel


def test_minifying_is_deterministic_across_processes():
    """Same sources, same bytes: in two fresh interpreters with different hash seeds (python-minifier
    walks sets of names) and in this one."""
    modules = runtime_modules(tiny_recipe())
    code = ("import hashlib, sys; from pipeline.codegen import ROOT, minify_module; h = hashlib.sha256()\n"
            "for rel in sys.argv[1:]: h.update(minify_module((ROOT / rel).read_text()).encode() + b'\\0')\n"
            "print(h.hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code, *modules], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed)) for seed in ("1", "2")]
    digests = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    here = hashlib.sha256(b"".join(minify_module((ROOT / rel).read_text()).encode() + b"\0" for rel in modules))
    assert digests[0] == digests[1] == here.hexdigest()
    recipe = tiny_recipe()
    assert render_train_gpt(recipe) == render_train_gpt(recipe)


def test_the_script_carries_only_the_parts_its_recipe_uses():
    sidecar = set(runtime_modules(load_recipe("sidecar48")))
    recurrent = set(runtime_modules(load_recipe("depth_recurrent")))
    assert {"pipeline/model/gpt.py", "pipeline/model/parts/sidecar.py", "pipeline/script_entry.py",
            "pipeline/stages/train.py", "eval/scorer.py", "pipeline/model/parts/__init__.py"} <= sidecar
    assert not any("recurrent" in m for m in sidecar)
    seed_parts = {"pipeline/model/parts/true_evolving.py", "pipeline/model/parts/elita.py",
                  "pipeline/model/parts/orthopar.py", "pipeline/model/parts/normalizers.py"}
    assert not seed_parts & sidecar
    assert "pipeline/model/parts/true_evolving.py" in runtime_modules(load_recipe("true_evolving"))
    assert "pipeline/model/parts/normalizers.py" in runtime_modules(load_recipe("shiftmax_mix"))
    assert {"pipeline/model/recurrent.py", "pipeline/model/recurrent_parts.py"} <= recurrent
    assert "pipeline/model/gpt.py" not in recurrent
    # nothing the submission may not import: the CLI, recipe loading, packaging and plots stay out,
    # and so does this generator (it imports python-minifier and brotli)
    assert "pipeline/codegen.py" not in sidecar | recurrent
    assert not {"pipeline/cli.py", "pipeline/recipe.py", "pipeline/export/predict.py", "pipeline/plots.py",
                "pipeline/records.py", "pipeline/run.py", "pipeline/preflight.py"} & sidecar


def test_the_script_carries_only_what_it_runs():
    """pgolf run's checkpointing and the cpu_workers threads are imported by name: the script for a
    recipe without cpu_workers carries neither, and generation-time pruning drops what pgolf's other
    commands use (tokenizer training, shard writing)."""
    sidecar = load_recipe("sidecar48")
    modules = set(runtime_modules(sidecar))
    assert "pipeline/stages/train.py" in modules
    assert not {"pipeline/stages/checkpoint.py", "pipeline/stages/cpu_workers.py"} & modules
    threaded = set(runtime_modules(load_recipe("tiny", ["train.cpu_workers=2"])))
    assert "pipeline/stages/cpu_workers.py" in threaded and "pipeline/stages/checkpoint.py" not in threaded
    shipped = shipped_sources(sidecar)
    assert "class ShardWriter" not in shipped["pipeline/data/shards.py"]
    assert "def train_tokenizer" not in shipped["pipeline/data/tokenizer.py"]
    assert "def load_shard" in shipped["pipeline/data/shards.py"]
    assert "@register(\"attention\", \"causal\"" in shipped["pipeline/model/parts/attention.py"]  # registered at import


def test_check_prints_the_code_bytes_codec_and_sizes():
    from click.testing import CliRunner

    from pipeline.cli import cli

    res = CliRunner().invoke(cli, ["check", "tiny", "--set", "package.code_codec=lzma"])
    assert res.exit_code == 0, res.output
    built = build_train_gpt(load_recipe("tiny", ["package.code_codec=lzma"]))
    lines = res.output.splitlines()
    assert f"bytes_code={built.nbytes}" in lines
    assert (f"bytes_code_codec=lzma bytes_code_source={built.source_bytes} "
            f"bytes_code_minified={built.minified_bytes}") in lines
