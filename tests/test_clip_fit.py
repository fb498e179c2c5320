"""quant.fit_clip: SD-clip widened by the smallest scale that lands the artifact under the cap."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.config import PackageConfig
from pipeline.errors import SizeCapError, UserError
from pipeline.export import codec
from pipeline.export.artifact import serialize
from pipeline.export.clip_fit import fit_clip, scaled, smallest_fitting_scale
from pipeline.export.plan import quantize_state_dict
from pipeline.recipe import load_recipe
from conftest import TINY_SETS

RULES = ("quant.rules=[{scheme: int6, pattern: '\\.w$', clip_sigmas: 3.0}, "
         "{scheme: int8, pattern: '\\.v$', clip_sigmas: 5.0}, {scheme: fp16}]")


def _quant(*extra):
    return load_recipe("tiny", [RULES, *extra]).quant


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.w": torch.randn(64, 256, generator=g) * 0.02, "b.v": torch.randn(32, 128, generator=g) * 0.05,
            "c.bias": torch.randn(64, generator=g)}


def _total(state, quant, package, scale):
    q = quantize_state_dict(state, scaled(quant, scale))
    return len(codec.compress(serialize(q, {}), package.compressor, package.level))


def test_bisection_finds_the_smallest_fitting_scale_to_its_resolution():
    def total(s):  # falls as the scale grows; 800 bytes at s = 1.25
        return int(1000 / s)
    scale, trials = smallest_fitting_scale(total, 800, max_scale=1.5, steps=4)
    assert len(trials) == 2 + 4 and trials[:2] == [(1.0, 1000), (1.5, 666)]
    assert total(scale) <= 800 and total(scale - 0.5 / 2 ** 4) > 800
    assert smallest_fitting_scale(total, 1000, 1.5, 4) == (1.0, [(1.0, 1000)])  # fits: one trial, untouched
    assert smallest_fitting_scale(total, 600, 1.5, 4) == (None, [(1.0, 1000), (1.5, 666)])


@pytest.mark.parametrize("sets, code_bytes, advice", [
    ([], 10, r"limit of 600 bytes \(package.cap_bytes\) .* \(1,000 bytes at 1x, 666 bytes at 1.5x, code included\); "
             r"raise quant.fit_clip.max_scale \(at most 10\)"),
    (["quant.fit_clip.max_scale=10"], 10, r"widened 10x .*; use fewer parameters or a stronger quant plan"),
    (["quant.fit_clip.margin_bytes=400"], 700,  # the limit spelled out, and the code alone is over it
     r"limit of 200 bytes \(package.cap_bytes 600 less quant.fit_clip.margin_bytes 400\) .* the code alone is 700 "
     r"bytes, so no model fits; raise the limit"),
])
def test_a_fit_that_cannot_succeed_says_why_and_what_could(sets, code_bytes, advice):
    from pipeline.export.clip_fit import no_fit_message

    recipe = load_recipe("tiny", [RULES, "quant.fit_clip={}", "package.cap_bytes=600", *sets])
    trials = [(1.0, 1000), (recipe.quant.fit_clip.max_scale, 666)]
    assert re.search(advice, no_fit_message(recipe.quant, recipe.package, code_bytes, trials))


def test_a_margin_at_or_over_the_cap_is_refused_at_load():
    with pytest.raises(UserError, match=r"quant.fit_clip.margin_bytes \(500,000\) must be below package.cap_bytes "
                                        r"\(400,000\)"):
        load_recipe("tiny", [RULES, "quant.fit_clip={margin_bytes: 500000}", "package.cap_bytes=400000"])


def test_clip_sigmas_rules_that_quantize_no_tensor_are_refused():
    # tiny's fp16 rule for small tensors comes first and takes every tensor the clip rule matches
    shadowed = ("quant.rules=[{scheme: fp16, max_numel: 100000000}, "
                "{scheme: int6, pattern: '\\.w$', clip_sigmas: 3.0}]")
    quant = load_recipe("tiny", [shadowed, "quant.fit_clip={}"]).quant
    with pytest.raises(UserError, match=r"no tensor is quantized under a rule with clip_sigmas: quant.rules \[1\]"):
        fit_clip(_state(), quant, PackageConfig(), code_bytes=0, meta={})


def test_scaled_multiplies_only_the_rules_that_set_clip_sigmas():
    q = scaled(_quant(), 1.25)
    assert [r.clip_sigmas for r in q.rules] == [3.75, 6.25, None]


def test_fit_clip_lands_just_under_the_cap_with_the_real_packer():
    state, quant0 = _state(), _quant()
    zstd = PackageConfig(compressor="zstd", level=22)
    at1, at_max = _total(state, quant0, zstd, 1.0), _total(state, quant0, zstd, 1.5)
    assert at_max < at1  # a wider clip is a coarser step: fewer bytes
    cap = (at1 + at_max) // 2 + 100  # 100 code bytes on top of the blob
    quant = _quant("quant.fit_clip={max_scale: 1.5, steps: 5}")
    package = PackageConfig(compressor="zstd", level=22, cap_bytes=cap)
    fitted = fit_clip(state, quant, package, code_bytes=100, meta={})
    assert 1.0 < fitted.scale <= 1.5 and len(fitted.trials) == 7
    blob = codec.compress(serialize(fitted.qmodel, {}), "zstd", 22)
    assert fitted.packed == blob and len(blob) + 100 <= cap  # the blob export writes, packed once
    # one bisection step lower does not fit: the smallest scale to the search's resolution
    assert _total(state, quant0, zstd, fitted.scale - 0.5 / 2 ** 5) + 100 > cap
    # the chosen clips are what the blob records
    _sd, doc = codec.decode_artifact(blob)
    assert doc["tensors"]["a.w"]["clip_sigmas"] == pytest.approx(3.0 * fitted.scale)
    assert doc["tensors"]["b.v"]["clip_sigmas"] == pytest.approx(5.0 * fitted.scale)


def test_a_blob_that_fits_is_the_recipes_own():
    state = _state()
    quant = _quant("quant.fit_clip={}")
    fitted = fit_clip(state, quant, PackageConfig(), code_bytes=0, meta={"x": 1})
    plain = quantize_state_dict(state, _quant())
    assert fitted.scale == 1.0 and len(fitted.trials) == 1
    assert serialize(fitted.qmodel, {"x": 1}) == serialize(plain, {"x": 1})


def test_fit_clip_needs_a_rule_with_clip_sigmas():
    with pytest.raises(UserError, match="no rule in quant.rules sets clip_sigmas"):
        load_recipe("tiny", ["quant.fit_clip={}"])


def test_only_a_fit_clip_recipes_script_carries_the_module():
    from pipeline.codegen import runtime_modules

    assert "pipeline/export/clip_fit.py" in runtime_modules(load_recipe("tiny", [RULES, "quant.fit_clip={}"]))
    assert "pipeline/export/clip_fit.py" not in runtime_modules(load_recipe("tiny", [RULES]))


def test_a_run_over_the_cap_fits_and_says_by_how_much(small_data, tmp_path):
    from pipeline.distributed import init
    from pipeline.run import run_recipe

    sets = [*TINY_SETS, "ttt.enabled=false", "train.max_steps=4",
            "quant.rules=[{scheme: fp32, roles: [control, gate]}, {scheme: int6, roles: [matrix], clip_sigmas: 3.0}, "
            "{scheme: int8, roles: [embedding], clip_sigmas: 4.0}, {scheme: fp16}]"]
    plain = run_recipe(load_recipe("tiny", sets), small_data, tmp_path / "a", init("cpu"), echo=lambda s: None,
                       code_bytes=0)
    assert plain["clip_scale"] is None
    cap = plain["bytes_total"] - 200  # the recipe's own clips are 200 bytes over
    lines: list[str] = []
    report = run_recipe(load_recipe("tiny", [*sets, f"package.cap_bytes={cap}", "quant.fit_clip={steps: 3}"]),
                        small_data, tmp_path / "b", init("cpu"), echo=lines.append, code_bytes=0)
    assert 1.0 < report["clip_scale"] <= 1.5 and report["bytes_total"] <= cap
    (line,) = [x for x in lines if x.startswith("clip_fit ")]
    assert line.startswith(f"clip_fit clip_scale={report['clip_scale']:.6f} tried(scale:bytes_total)=1.000000:")
    assert f"summary clip_scale={report['clip_scale']}" in lines
    (export,) = list((tmp_path / "b").glob("tiny/*/seed1337/export/model.bin"))
    doc = json.loads(json.dumps(codec.decode_artifact(export.read_bytes())[1]))
    assert doc["tensors"]["blocks.0.mlp.fc.weight"]["clip_sigmas"] == pytest.approx(3.0 * report["clip_scale"])
    # a cap no scale reaches: refused, the reason in the run's log too, and no blob or report of the
    # earlier export left looking current
    with pytest.raises(SizeCapError, match="quant.fit_clip: the artifact does not fit"):
        run_recipe(load_recipe("tiny", [*sets, f"package.cap_bytes={cap // 2}", "quant.fit_clip={steps: 3}"]),
                   small_data, tmp_path / "b", init("cpu"), echo=lambda s: None, code_bytes=0)
    run_dir = export.parent.parent
    assert not export.exists() and not (run_dir / "report.json").exists()
    assert (run_dir / "train.log").read_text().splitlines()[-1].startswith("error: quant.fit_clip: the artifact")


@pytest.mark.parametrize("tails", ["laplace", "student_t5"])
def test_under_sd_clip_heavier_tails_than_the_gaussian_stand_in_code_smaller(tails):
    """Why `pgolf check`'s Gaussian stand-ins lean high for SD-clip rules: at a fixed row variance the
    Gaussian has the largest entropy, so heavier-tailed (trained-like) rows take fewer bytes."""
    torch.manual_seed(0)
    gauss = torch.randn(256, 1024)
    heavy = (torch.distributions.Laplace(0.0, 1.0) if tails == "laplace"
             else torch.distributions.StudentT(5.0)).sample((256, 1024))
    for k in (11.5, 13.0):  # the 1.0611 record's MLP and attention clips; rule 0 is int6 on "a.w"
        quant = scaled(_quant(), k / 3.0)
        sizes = [len(codec.compress(serialize(quantize_state_dict({"a.w": w}, quant), {}), "brotli", 11))
                 for w in (gauss, heavy)]
        assert sizes[1] < 0.99 * sizes[0], (k, sizes)


def test_check_predicts_the_scale_or_says_none_fits():
    from click.testing import CliRunner

    from pipeline.cli import cli

    sets = ["--set", "quant.rules=[{scheme: fp32, roles: [control, gate]}, "
                     "{scheme: int6, roles: [matrix, embedding], clip_sigmas: 3.0}, {scheme: fp16}]"]
    base = CliRunner().invoke(cli, ["check", "tiny", *sets])
    total = int(next(x for x in base.output.splitlines() if x.startswith("predicted_bytes_total=")).split("=")[1])
    out = CliRunner().invoke(cli, ["check", "tiny", *sets, "--set", f"package.cap_bytes={total - 3000}",
                                   "--set", "quant.fit_clip={max_scale: 2.0, steps: 6}"])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("predicted_clip_scale="))
    scale, fitted = float(line.split()[0].split("=")[1]), int(line.split()[1].split("=")[1])
    assert 1.0 < scale <= 2.0 and total - 3000 - 2000 < fitted <= total - 3000
    # the search starts from predicted_bytes_total itself: with room to spare it is that total, at scale 1
    roomy = CliRunner().invoke(cli, ["check", "tiny", *sets, "--set", "quant.fit_clip={}"]).output
    own = int(next(x for x in roomy.splitlines() if x.startswith("predicted_bytes_total=")).split("=")[1])
    assert f"predicted_clip_scale=1.0000 predicted_bytes_total_fitted={own} " in roomy
    out = CliRunner().invoke(cli, ["check", "tiny", *sets, "--set", "package.cap_bytes=1000",
                                   "--set", "quant.fit_clip={}"])
    assert "predicted_clip_scale=none (quant.fit_clip: the artifact does not fit its limit of 1,000 bytes " \
           "(package.cap_bytes) even with every clip_sigmas widened 1.5x" in out.output
    assert "the code alone is" in out.output
