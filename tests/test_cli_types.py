"""The click parameter types of pipeline.cli_types: each returns the parsed value or refuses
with click's BadParameter (exit code 2, the option named), for any text at all.

    .venv/bin/python -m pytest -q tests/test_cli_types.py
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli_types import DEVICE, OUTPUT_DIR, SEED, SEED_LIST, SEED_MAX
from pipeline.recipe import load_recipe

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def convert(ptype, value):
    return ptype.convert(value, None, None)


def refusal(ptype, value) -> str:
    with pytest.raises(click.BadParameter) as e:
        convert(ptype, value)
    return e.value.message


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("text, seeds", [
    ("1337,42,2025", [1337, 42, 2025]),
    (" 7 , 8 ", [7, 8]),
    ("0", [0]),
    ("1_000", [1000]),
    (str(SEED_MAX), [SEED_MAX]),
    (["3", 4], [3, 4]),
])
def test_seed_list_parses(text, seeds):
    assert convert(SEED_LIST, text) == seeds


@pytest.mark.parametrize("text, fragment", [
    ("", "no seeds given"),
    (" , ", "no seeds given"),
    ("1,,2", "seed 2 is empty; remove the extra comma"),
    ("1,", "seed 2 is empty"),
    ("1,-2", "'-2' is not a seed"),
    ("1,x", "'x' is not a seed"),
    ("1.5", "'1.5' is not a seed"),
    (str(SEED_MAX + 1), f"'{SEED_MAX + 1}' is not a seed; each must be a whole number from 0 to {SEED_MAX}"),
    ("5,6,5", "seed 5 is given twice"),
    (None, "is not a list of seeds"),
])
def test_seed_list_refuses(text, fragment):
    assert fragment in refusal(SEED_LIST, text)


def test_seed_refuses_what_the_recipe_would():
    assert convert(SEED, "42") == 42 and convert(SEED, 7) == 7
    for bad in ("-1", "x", "", str(SEED_MAX + 1), True, 1.5):
        assert "is not a seed" in refusal(SEED, bad)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789,-_ x", max_size=40)))
def test_seed_list_on_any_text_parses_or_refuses(text):
    try:
        seeds = convert(SEED_LIST, text)
    except click.BadParameter as e:
        assert e.message
        return
    assert seeds and len(set(seeds)) == len(seeds) and all(0 <= s <= SEED_MAX for s in seeds)
    assert [str(s) for s in seeds] == [t.strip().replace("_", "").lstrip("0") or "0" for t in text.split(",")]


@FUZZ
@given(st.text(max_size=12))
def test_a_seed_the_parser_accepts_loads(text):
    try:
        seed = convert(SEED, text)
    except click.BadParameter:
        return
    assert load_recipe("tiny", seed=seed).seed == seed


# ----------------------------------------------------------------------------- device


@pytest.mark.parametrize("text, device", [
    ("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"), (" CUDA:07 ", "cuda:7")])
def test_device_parses(text, device):
    assert convert(DEVICE, text) == device


@pytest.mark.parametrize("text, fragment", [
    ("cdua", "Did you mean 'cuda'?"), ("gpu", "use auto, cpu, cuda or cuda:N"), ("cuda:", "is not a device"),
    ("cuda:-1", "is not a device"), ("cuda:x", "is not a device"), ("", "is not a device"), (3, "is not a device")])
def test_device_refuses(text, fragment):
    assert fragment in refusal(DEVICE, text)


@FUZZ
@given(st.one_of(st.text(max_size=12), st.from_regex(r"(cuda|cpu|auto)(:[0-9a-z-]{0,6})?", fullmatch=True)))
def test_device_on_any_text_parses_or_refuses(text):
    try:
        device = convert(DEVICE, text)
    except click.BadParameter as e:
        assert "is not a device" in e.message
        return
    assert device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


# ----------------------------------------------------------------------------- output folders


def test_output_dir_accepts_new_and_existing_folders(tmp_path):
    assert convert(OUTPUT_DIR, str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert convert(OUTPUT_DIR, tmp_path) == tmp_path
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_output_dir_refuses_files_and_bad_names(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is an existing file, not a folder" in refusal(OUTPUT_DIR, str(tmp_path / "file"))
    assert "is inside" in refusal(OUTPUT_DIR, str(tmp_path / "file" / "sub"))
    assert "is not a folder path" in refusal(OUTPUT_DIR, "")
    assert "longer than 255 bytes" in refusal(OUTPUT_DIR, str(tmp_path / ("x" * 300)))
    assert "NUL" in refusal(OUTPUT_DIR, str(tmp_path / "a\x00b"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_output_dir_refuses_a_folder_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "permission denied" in refusal(OUTPUT_DIR, str(locked / "out"))
    finally:
        locked.chmod(0o700)


@FUZZ
@given(st.text(max_size=30))
def test_output_dir_on_any_text_parses_or_refuses(text):
    try:
        path = convert(OUTPUT_DIR, text)
    except click.BadParameter as e:
        assert e.message
        return
    assert isinstance(path, Path) and not (path.exists() and not path.is_dir())


# ----------------------------------------------------------------------------- through click


@click.command()
@click.option("--seeds", type=SEED_LIST, default="1337,42,2025")
@click.option("--device", type=DEVICE, default="auto")
@click.option("--out", type=OUTPUT_DIR, default=Path("artifacts"))
def _demo(seeds, device, out):
    click.echo(f"seeds={seeds} device={device} out={out}")


def test_types_through_click(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(_demo, ["--out", str(tmp_path / "o")])
    assert ok.exit_code == 0 and ok.output == f"seeds=[1337, 42, 2025] device=auto out={tmp_path / 'o'}\n"
    (tmp_path / "f").write_text("")
    for args, fragment in ((["--seeds", "1,1"], "Invalid value for '--seeds': '1,1': seed 1 is given twice"),
                           (["--device", "gpu"], "Invalid value for '--device': 'gpu' is not a device"),
                           (["--out", str(tmp_path / "f")], "Invalid value for '--out'")):
        bad = runner.invoke(_demo, args)
        assert bad.exit_code == 2 and fragment in bad.output and "Traceback" not in bad.output, bad.output
