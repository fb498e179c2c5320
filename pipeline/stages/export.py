"""Stage `export`: the trained weights become the artifact, written to disk and read back.

    quantize (the recipe's plan, then LQER if set; with quant.fit_clip, SD-clip widened until the blob
    fits, export/clip_fit.py) -> pack (zstd-22 by default; sha256 beside it,
    size gate) -> read the blob back from disk (checksum, decode, every tensor finite)

The weights come from the train stage's file, checked against the sha256 it recorded. The blob's
metadata is the recipe name, seed and model config, so `pgolf run` and the shipped `train_gpt.py`
write byte-identical blobs for the same weights. Sizes under the recipe's `quant.compare` plans
(e.g. PR #298's int8 + zlib-9) are reported beside it, unscored, and so are the sizes of the same
blob's container under `package.compare_compressors` (e.g. brotli, brotli_shuffle, pergroup), each
with its compression seconds, as `compare["compressor:<name>"]`. The plan reads each tensor's
parameter role from the recipe's model (built on the meta device: shapes and roles only), and
hands a calibrating scheme what it gathered in the train stage (pipeline.export.calibration).
Runtime-pure.
"""

from __future__ import annotations

import time

import torch

from pipeline.config import Recipe, to_dict
from pipeline.distributed import barrier, broadcast_from_main
from pipeline.errors import UserError
from pipeline.export.artifact import effective_level, group_codec, load_artifact, package_model, serialize, size_lines
from pipeline.export.codec import CLIP_FIT_MODULE, compress, extension
from pipeline.export.calibration import calibrating_schemes, load_calibration
from pipeline.export.plan import quantize_state_dict
from pipeline.fileio import file_sha256
from pipeline.model.roles import tensor_roles
from pipeline.stages.base import Context, Stage
from pipeline.stages.train_stage import CALIBRATION, WEIGHTS

BLOB = "model.bin"


def load_weights(ctx: Context) -> dict[str, torch.Tensor]:
    """The train stage's exported state_dict (CPU tensors), verified against its recorded sha256."""
    path = ctx.path("train", WEIGHTS)
    expected = ctx.outputs["train"]["weights_sha256"]
    if not path.is_file() or file_sha256(path) != expected:
        raise UserError(f"{path} is missing or does not match the sha256 the train stage recorded ({expected[:12]}…); "
                        "it was changed after training. Delete it and rerun to retrain, or restore it.")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_train_calibration(ctx: Context) -> dict | None:
    """What the train stage's calibrating schemes gathered, verified against its recorded sha256
    (None when no scheme of the recipe calibrates)."""
    expected = ctx.outputs["train"].get("calibration_sha256")
    if expected is None:
        if calibrating_schemes(ctx.recipe):  # cannot happen through the stage keys; never encode without it
            raise UserError(f"quant schemes {calibrating_schemes(ctx.recipe)} calibrate in the train stage, which "
                            "recorded no calibration; delete the train folder and rerun.")
        return None
    path = ctx.path("train", CALIBRATION)
    if not path.is_file() or file_sha256(path) != expected:
        raise UserError(f"{path} is missing or does not match the sha256 the train stage recorded ({expected[:12]}…); "
                        "delete the train folder and rerun to recalibrate.")
    return load_calibration(path)


def blob_meta(recipe: Recipe) -> dict:
    """The identity written into the blob: same recipe and weights, same bytes, whoever writes it."""
    return {"recipe": recipe.name, "seed": recipe.seed, "model": to_dict(recipe.model)}


def compare_sizes(state: dict, recipe: Recipe, roles: dict, calibration: dict | None = None) -> dict:
    """Model bytes under each `quant.compare` plan, unscored."""
    sizes = {}
    for plan in recipe.quant.compare:
        q = quantize_state_dict(state, plan.rules, roles=roles, calibration=calibration)
        sizes[plan.name] = len(compress(serialize(q, {"recipe": recipe.name, "plan": plan.name}),
                                        plan.compressor, plan.level))
    return sizes


def compare_compressors(raw: bytes, recipe: Recipe) -> tuple[dict, dict]:
    """({"compressor:<name>": bytes}, {name: seconds or the reason it is unavailable}) of the
    container `raw` under each of `package.compare_compressors`."""
    sizes, seconds = {}, {}
    for name in recipe.package.compare_compressors:
        if name == "pergroup":
            from pipeline.export.codec import PACKAGER_MODULE, extension

            packagers = extension(PACKAGER_MODULE)
            if not packagers.lrzip_available():
                seconds[name] = f"unavailable: the lrzip program is not installed; {packagers.LRZIP_FIX}"
                continue
        t0 = time.perf_counter()
        sizes[f"compressor:{name}"] = len(compress(raw, name, recipe.package.level))
        seconds[name] = round(time.perf_counter() - t0, 3)
    return sizes, seconds


def _run_export(ctx: Context) -> dict:
    r = ctx.recipe
    blob = ctx.path("export", BLOB)
    # Rank 0 writes the blob; every rank then reads the same file back (a failure on rank 0
    # reaches the others as the same error instead of a hang).
    result = None
    if ctx.dist.is_main:
        try:
            state, calibration = load_weights(ctx), load_train_calibration(ctx)
            roles = tensor_roles(r.model)
            fitted = None
            if r.quant.fit_clip is not None:  # widen SD-clip until the blob fits (export/clip_fit.py)
                fitted = extension(CLIP_FIT_MODULE).fit_clip(state, r.quant, r.package, ctx.code_bytes, blob_meta(r),
                                                             roles=roles, calibration=calibration)
                qmodel = fitted.qmodel
            else:
                qmodel = quantize_state_dict(state, r.quant, roles=roles, calibration=calibration)
            result = package_model(qmodel, blob, r.package, ctx.code_bytes, meta=blob_meta(r),
                                   packed=fitted.packed if fitted is not None else None)
            if fitted is not None:
                result["clip_scale"], result["clip_fit_trials"] = fitted.scale, fitted.trials
            result["compare"] = compare_sizes(state, r, roles, calibration)
            if r.package.compare_compressors:
                sizes, seconds = compare_compressors(serialize(qmodel, blob_meta(r)), r)
                result["compare"] |= sizes
                result["compressor_seconds"] = seconds
        except UserError as e:
            broadcast_from_main(ctx.dist, ("error", type(e), str(e)))
            raise
        broadcast_from_main(ctx.dist, ("ok", None, result))
    else:
        status, kind, payload = broadcast_from_main(ctx.dist, None)
        if status == "error":
            raise kind(payload)
        result = payload
    barrier(ctx.dist)
    decoded, _meta = load_artifact(blob, result["sha256"])  # what ships, read back from disk
    for line in size_lines(result):
        ctx.log(line)
    if "clip_scale" in result:
        tried = " ".join(f"{scale:.6f}:{total}" for scale, total in result["clip_fit_trials"])
        ctx.log(f"clip_fit clip_scale={result['clip_scale']:.6f} tried(scale:bytes_total)={tried}")
    codec_note = "" if group_codec(r.package.compressor) == r.package.compressor else \
        f" codec={group_codec(r.package.compressor)}"  # pergroup's per-group estimate is brotli's
    if result["groups"]:
        ctx.log("export_groups: each group's tensors compressed on their own, an estimate of its share of the blob "
                "(one stream over all groups packs differently)")
    for group, g in result["groups"].items():
        ctx.log(f"export_group group={group} tensors={g['tensors']} raw_bytes={g['raw_bytes']} "
                f"compressed_bytes={g['compressed_bytes']}{codec_note}")
    for name, nbytes in result["compare"].items():
        if not name.startswith("compressor:"):
            ctx.log(f"Compare plan {name}: model {nbytes} bytes + code {ctx.code_bytes} = "
                    f"{nbytes + ctx.code_bytes} bytes")
    for name, secs in result.get("compressor_seconds", {}).items():
        nbytes = result["compare"].get(f"compressor:{name}")
        if nbytes is None:
            ctx.log(f"Compare compressor {name}: {secs}")
        else:
            level = effective_level(name, r.package.level)
            ctx.log(f"Compare compressor {name}-{level}: model {nbytes} bytes ({nbytes - result['bytes_model']:+d} vs "
                    f"{r.package.compressor}) compress_s={secs:.2f}")
    ctx.log(f"export_done artifact_sha256={result['sha256']} tensors={len(decoded)} read_back=ok")
    return result


def export_config(ctx: Context) -> dict:
    return {"quant": to_dict(ctx.recipe.quant), "package": to_dict(ctx.recipe.package),
            "meta": blob_meta(ctx.recipe), "code_bytes": ctx.code_bytes}


EXPORT = Stage("export", depends_on=export_config, data_inputs=(), files=(BLOB, BLOB + ".sha256"), run=_run_export)
