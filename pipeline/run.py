"""`pgolf run`: one recipe and seed through the one list of stages, with content-keyed caching.

    report = run_recipe(recipe, data_dir, Path("artifacts"), dist_info)

The run folder is `<out>/<recipe>/<data tag>/seed<seed>/`, where the data tag is the data
directory's name and 8 hex digits of its content hash: runs on different data never share a folder.
Each stage (pipeline.stages.sequence.STAGES) writes its folder there with a manifest keyed on its
settings, the content of its data, the code and its upstream outputs (pipeline.stage_cache); a stage
whose key matches and whose files are intact is skipped, so an interrupted run resumes, and training
resumes from its checkpoint only under the same key. Every reported score comes from the blob read
back from disk; `report.json`, `train.log` and `report.png` sit in the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from pipeline.config import Recipe
from pipeline.data.identity import check_meta, published_export_problem
from pipeline.data.shards import list_shards, read_header
from pipeline.distributed import DistInfo, barrier, broadcast_from_main
from pipeline.errors import UserError
from pipeline.fileio import canonical_hash
from pipeline.inert import inert_settings
from pipeline.preflight import preflight
from pipeline.provenance import FileHashCache, cache_root, code_identity, data_identity, safe_join
from pipeline.stage_cache import StageCache
from pipeline.stages import evaluate as ev
from pipeline.stages.base import Context, Logger, Stage
from pipeline.stages.report import REPORT_JSON, legality_tag
from pipeline.stages.sequence import STAGES
from pipeline.stages.train import training_config


REPORT_PLOT = "report.png"


def run_dir_for(recipe: Recipe, out_root: Path, data_tag: str) -> Path:
    """`<out_root>/<recipe name>/<data tag>/seed<seed>`, refusing anything outside `out_root`."""
    return safe_join(out_root, recipe.name, data_tag, f"seed{recipe.seed}")


def identify_data(data_dir: Path, recipe: Recipe, dist_info: DistInfo, log: Callable[[str], None],
                  tokenizer_path: Optional[Path] = None):
    """Load the data directory, check it against its meta.json, and hash its content (rank 0 reads
    the files; every rank gets the same identity). Returns (Data, identity dict, the sentence
    saying how it differs from the challenge's published export it looks like, or None)."""
    data_dir = Path(data_dir)
    data = ev.load_data(data_dir, recipe, tokenizer_path)
    tok = Path(tokenizer_path) if tokenizer_path else data_dir / "tokenizer.model"
    ident = None
    if dist_info.is_main:
        ident = data_identity(data_dir, tok, FileHashCache(cache_root() / "file_hashes.json"))
    ident = broadcast_from_main(dist_info, ident)
    check_meta(data_dir, tok, data.train_shards, list_shards(data_dir, "val"), train_docs=ident["train_docs"])
    val_count = sum(read_header(p) for p in list_shards(data_dir, "val"))
    problem = published_export_problem(data.train_shards, ident["tokenizer"], val_count, recipe.eval.seq_len)
    if problem:
        log(f"warning: {problem}")
    return data, ident, problem


def stage_key(stage: Stage, ctx: Context) -> dict:
    """Everything that produced `stage`'s outputs: settings, data content, code, upstream outputs."""
    ident, code = ctx.provenance["data"], ctx.provenance["code"]
    wanted = set(stage.data_inputs) | ({"val_bytes"} if "val" in stage.data_inputs else set())
    return {"stage": stage.name, "config": stage.depends_on(ctx),
            "data": {k: ident[k] for k in sorted(wanted) if k in ident}, "code": code,
            "upstream": {name: canonical_hash(out) for name, out in ctx.outputs.items()}}


def run_cached(stage: Stage, ctx: Context, run_dir: Path) -> dict:
    """Reuse the stage's verified outputs, or run it and record them (rank 0 decides and writes)."""
    if not stage.cached:
        return stage.run(ctx)
    cache = StageCache(run_dir / stage.name, stage_key(stage, ctx))
    found = cache.lookup() if ctx.dist.is_main else None
    outputs, reason = broadcast_from_main(ctx.dist, found)
    if outputs is not None:
        ctx.log(f"skip stage={stage.name} (manifest and files match)")
        return outputs
    if reason:
        ctx.log(f"stage {stage.name} runs again: {reason}")
    if ctx.dist.is_main:
        cache.start(stage.files)
        # the run's report and plot are derived from every stage: gone until the report stage rewrites them
        for derived in (_run_path(run_dir, "report", REPORT_JSON), run_dir / REPORT_PLOT):
            if derived.exists():
                derived.unlink()
    barrier(ctx.dist)
    outputs = stage.run(ctx)
    if ctx.dist.is_main:
        cache.finish(outputs, stage.files)
    barrier(ctx.dist)
    return outputs


def _run_path(run_dir: Path, stage: str, name: str) -> Path:
    # Each stage's files in its own folder; report.json in the run folder itself (DESIGN.md §4).
    return run_dir / name if stage == "report" else run_dir / stage / name


def run_recipe(recipe: Recipe, data_dir: Path, out_root: Path, dist_info: DistInfo,
               echo: Callable[[str], None] = print, progress_factory=None, code_bytes: Optional[int] = None) -> dict:
    console = Logger(echo, legality_tag(recipe), enabled=dist_info.is_main)
    data, ident, _problem = identify_data(data_dir, recipe, dist_info, console)
    run_dir = run_dir_for(recipe, out_root, ident["tag"])
    log = Logger(echo, legality_tag(recipe), run_dir / "train.log", enabled=dist_info.is_main)
    code = code_identity(recipe)
    if code_bytes is None:
        from pipeline.codegen import generated_code_bytes

        code_bytes = generated_code_bytes(recipe)
    log(f"run recipe={recipe.name} seed={recipe.seed} device={dist_info.device} world_size={dist_info.world_size} "
        f"data={data_dir} data_tag={ident['tag']} train_shards={len(data.train_shards)} "
        f"val_tokens={data.val_tokens.size}")
    log(f"run_dir={run_dir}")
    for note in inert_settings(recipe):  # settings with no effect in this recipe: said, not ignored
        log(f"note: {note}")
    ctx = Context(recipe=recipe, dist=dist_info, data=data, log=log, code_bytes=code_bytes,
                  path=lambda stage, name: _run_path(run_dir, stage, name), checkpoint_dir=run_dir / "train",
                  checkpoint_key={"training": training_config(recipe), "train_data": ident["train"],
                                  "code": code["runtime_sha256"]},
                  progress_factory=progress_factory, preflight=preflight,
                  provenance={"data": ident, "code": code, "tokenizer_sha256": ident["tokenizer"]})
    try:
        for stage in STAGES:
            ctx.outputs[stage.name] = run_cached(stage, ctx, run_dir)
    except UserError as e:  # the CLI prints it; the run's log keeps why the run stopped too
        log.to_file(f"error: {e}")
        raise
    except KeyboardInterrupt:
        log.to_file("interrupted (Ctrl-C); rerun the same command to resume")
        raise
    report = ctx.outputs["report"]
    if dist_info.is_main:
        from pipeline.plots import plot_run

        plot_run(report, ctx.outputs["train"]["history"], run_dir / REPORT_PLOT)
    return report
