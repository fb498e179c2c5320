"""`pgolf run`: one recipe and seed through every stage, resumably, ending in report.json.

    train -> EMA -> quantize -> package -> roundtrip -> (score-first TTT) -> sliding-window bpb

Stages write `artifacts/<recipe>/seed<seed>/<stage>/` with a manifest; a stage whose manifest
matches is skipped, and an interrupted training resumes from its checkpoint. Every reported
score except `val_bpb_prequant` (a diagnostic) comes from the model read back from the blob.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.config import Recipe, to_dict
from pipeline.data.shards import list_shards
from pipeline.distributed import DistInfo
from pipeline.fileio import file_sha256, write_json_atomic
from pipeline.model import build_model
from pipeline.quant import compress
from pipeline.stages import evaluate as ev
from pipeline.stages.manifest import Stage, canonical_hash
from pipeline.stages.package import package_model, serialize, size_lines
from pipeline.stages.quantize import quantize_state_dict
from pipeline.stages.roundtrip import roundtrip_into
from pipeline.stages.train import train, training_config

NONCOMPLIANT = "[NON-COMPLIANT: TTT trained on validation tokens before scoring them]"
NONCAUSAL = "[NON-CAUSAL: model.leaky_selective_state=true leaks future tokens]"


def run_dir_for(recipe: Recipe, out_root: Path) -> Path:
    return Path(out_root) / recipe.name / f"seed{recipe.seed}"


def warnings_tag(recipe: Recipe) -> str:
    tags = []
    if recipe.ttt.enabled and recipe.ttt.mode == "pre_score_full_val":
        tags.append(NONCOMPLIANT)
    if recipe.model.leaky_selective_state:
        tags.append(NONCAUSAL)
    return " ".join(tags)


class Logger:
    """Rank-0 log lines to the console (via `echo`) and to the run's train.log, with legality tags."""

    def __init__(self, path: Path, echo: Callable[[str], None], tag: str, enabled: bool = True):
        self.path, self.echo, self.tag, self.enabled = path, echo, tag, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tag:
            line = f"{line} {self.tag}"
        self.echo(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def data_fingerprint(data_dir: Path) -> dict:
    files = sorted(list_shards(data_dir, "train") + list_shards(data_dir, "val"))
    return {"files": [(f.name, f.stat().st_size) for f in files],
            "tokenizer_sha256": file_sha256(data_dir / "tokenizer.model")}


def run_recipe(recipe: Recipe, data_dir: Path, out_root: Path, dist_info: DistInfo,
               echo: Callable[[str], None] = print, progress_factory=None, code_bytes: Optional[int] = None) -> dict:
    run_dir = run_dir_for(recipe, out_root)
    log = Logger(run_dir / "train.log", echo, warnings_tag(recipe), enabled=dist_info.is_main)
    data_dir = Path(data_dir)
    data = ev.load_data(data_dir, recipe)
    log(f"run recipe={recipe.name} seed={recipe.seed} device={dist_info.device} world_size={dist_info.world_size} "
        f"data={data_dir} train_shards={len(data.train_shards)} val_tokens={data.val_tokens.size}")
    fingerprint = data_fingerprint(data_dir)

    # ---------------------------------------------------------------- train + EMA
    train_stage = Stage(run_dir, "train", training_config(recipe), {"data": fingerprint})
    weights_path = train_stage.dir / "exported_weights.pt"
    cached = train_stage.cached()
    if cached is None:
        train_stage.dir.mkdir(parents=True, exist_ok=True)
        progress = progress_factory(recipe.train.max_steps) if progress_factory and dist_info.is_main else None
        validate = ev.make_validator(data, recipe, dist_info) if recipe.train.val_every else None
        try:
            result, exported = train(recipe, data.train_shards, train_stage.dir, dist_info, log=log,
                                     progress=progress, validate=validate)
        finally:
            if progress is not None:
                progress.close()
        if dist_info.is_main:
            tmp = weights_path.with_suffix(".tmp")
            torch.save(exported.state_dict(), tmp)
            tmp.replace(weights_path)
        cached = train_stage.finish({"steps": result.steps, "train_time_s": result.train_time_s,
                                     "tokens_seen": result.tokens_seen, "history": result.history,
                                     "weights_sha256": file_sha256(weights_path)},
                                    files=("exported_weights.pt",))
        log(f"train_done steps={result.steps} train_time={result.train_time_s:.1f}s tokens_seen={result.tokens_seen} "
            f"exported={'ema' if recipe.ema.enabled else 'raw'} weights")
    else:
        log(f"skip stage=train (manifest matches) steps={cached['steps']}")
    factory = lambda: build_model(recipe.model).to(dist_info.device)  # noqa: E731
    exported = factory()
    exported.load_state_dict(torch.load(weights_path, map_location=dist_info.device, weights_only=True))

    # ---------------------------------------------------------------- quantize + package
    if code_bytes is None:
        from pipeline.codegen import generated_code_bytes

        code_bytes = generated_code_bytes(recipe)
    pkg_stage = Stage(run_dir, "package", {"quant": to_dict(recipe.quant), "package": to_dict(recipe.package),
                                           "code_bytes": code_bytes}, {"weights": cached["weights_sha256"]})
    pkg = pkg_stage.cached()
    if pkg is None:
        pkg_stage.start()
        qmodel = quantize_state_dict({k: v.detach().cpu() for k, v in exported.state_dict().items()},
                                     recipe.quant.rules)
        pkg = package_model(qmodel, str(pkg_stage.dir), recipe.package, code_bytes,
                            meta={"recipe": recipe.name, "seed": recipe.seed, "model": to_dict(recipe.model)})
        pkg["compare"] = compare_sizes(exported, recipe)
        pkg = pkg_stage.finish(pkg | {"path": "model.bin"}, files=("model.bin",))
    for line in size_lines(pkg):
        log(line)
    for name, nbytes in pkg["compare"].items():
        code = pkg["bytes_code"]
        log(f"Compare plan {name}: model {nbytes} bytes + code {code} = {nbytes + code} bytes")
    blob_path = pkg_stage.dir / "model.bin"

    # ---------------------------------------------------------------- roundtrip + scoring
    eval_stage = Stage(run_dir, "evaluate", {"eval": to_dict(recipe.eval), "ttt": to_dict(recipe.ttt),
                                             "data": to_dict(recipe.data)},
                       {"blob": pkg["sha256"], "weights": cached["weights_sha256"], "data": fingerprint})
    scores = eval_stage.cached()
    if scores is None:
        eval_stage.start()
        t0 = time.perf_counter()
        prequant = ev.score(exported, data, recipe, dist_info, log, label="prequant")
        model = roundtrip_into(factory, str(blob_path), pkg["sha256"])
        roundtrip = ev.score(model, data, recipe, dist_info, log, label="roundtrip")
        ttt = ev.score_ttt(model, data, recipe, dist_info, log) if recipe.ttt.enabled else None
        scores = eval_stage.finish({"prequant": prequant, "roundtrip": roundtrip, "ttt": ttt,
                                    "eval_time_s": time.perf_counter() - t0})
    else:
        log("skip stage=evaluate (manifest matches)")

    report = build_report(recipe, dist_info, cached, pkg, scores, data)
    if dist_info.is_main:
        write_json_atomic(run_dir / "report.json", report)
        from pipeline.report import plot_run

        plot_run(report, cached["history"], run_dir / "report.png")
        if report["val_bytes_warning"]:
            log(report["val_bytes_warning"])
        log(f"report={run_dir / 'report.json'} plot={run_dir / 'report.png'}")
    return report


def compare_sizes(model, recipe: Recipe) -> dict:
    """Model bytes under each `quant.compare` plan (e.g. PR #298's int8 + zlib-9), unscored."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sizes = {}
    for plan in recipe.quant.compare:
        q = quantize_state_dict(state, plan.rules)
        sizes[plan.name] = len(compress(serialize(q, {"recipe": recipe.name, "plan": plan.name}),
                                        plan.compressor, plan.level))
    return sizes


def build_report(recipe: Recipe, dist_info: DistInfo, train_out: dict, pkg: dict, scores: dict, data) -> dict:
    final = scores["ttt"] or scores["roundtrip"]
    compliant = not (recipe.ttt.enabled and recipe.ttt.mode == "pre_score_full_val")
    causal = not recipe.model.leaky_selective_state
    with torch.device("meta"):
        params = build_model(recipe.model).num_params()
    warning = ""
    if data.val_raw_bytes is not None and data.val_stream_bytes != data.val_raw_bytes:
        warning = (f"warning: the tokenizer accounts {data.val_stream_bytes} of the validation text's "
                   f"{data.val_raw_bytes} raw bytes (it normalizes text); bpb counts the normalized bytes, "
                   f"exactly as the challenge scorer does")
    return {
        "recipe": recipe.name, "seed": recipe.seed,
        "val_bpb": final["val_bpb"], "val_loss": final["val_loss"],
        "val_bpb_prequant": scores["prequant"]["val_bpb"], "val_bpb_roundtrip": scores["roundtrip"]["val_bpb"],
        "val_bpb_ttt": scores["ttt"]["val_bpb"] if scores["ttt"] else None,
        "ttt_compliant": compliant, "causal": causal,
        "params": params, "bytes_model": pkg["bytes_model"], "bytes_code": pkg["bytes_code"],
        "bytes_total": pkg["bytes_total"], "cap_bytes": pkg["cap_bytes"],
        "bytes_model_compare": pkg.get("compare", {}),
        "steps": train_out["steps"], "train_time_s": train_out["train_time_s"],
        "eval_time_s": scores["eval_time_s"], "tokens_seen": train_out["tokens_seen"],
        "val_tokens": final["token_count"], "val_bytes": final["byte_count"],
        "val_stream_bytes": data.val_stream_bytes, "val_raw_bytes": data.val_raw_bytes,
        "val_bytes_warning": warning, "eval_mode": recipe.eval.mode,
        "device": str(dist_info.device), "world_size": dist_info.world_size,
        "recipe_config": to_dict(recipe), "recipe_hash": canonical_hash(to_dict(recipe)),
        "scores": scores,
    }


def final_line(report: dict) -> str:
    tag = ""
    if not report["ttt_compliant"]:
        tag += " " + NONCOMPLIANT
    if not report["causal"]:
        tag += " " + NONCAUSAL
    return f"final val_bpb={report['val_bpb']:.8f} bytes_total={report['bytes_total']}{tag}"
