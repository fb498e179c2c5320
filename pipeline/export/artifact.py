"""The artifact on disk: write the compressed blob, account its bytes, gate on the cap, read it back.

    qmodel = quantize_state_dict(model.state_dict(), recipe.quant.rules, roles=param_roles(model))
    result = package_model(qmodel, Path("export/model.bin"), recipe.package, code_bytes,
                           meta={"recipe": recipe.name, "seed": recipe.seed, "model": {...}})
    for line in size_lines(result): print(line)
    state_dict, meta = load_artifact("export/model.bin", expected_sha256=result["sha256"])
    model = roundtrip_into(lambda: build_model(recipe.model), "export/model.bin", result["sha256"])

`package_model` writes the blob and `<blob>.sha256` (`sha256sum -c` format), each through a
temporary name and os.replace, so a crash never leaves a half-written artifact. The total counted
against the cap is blob bytes + code bytes (pg_mechanics.md §3.6/§4.2.3). Over the cap it raises
SizeCapError and leaves no blob behind (a stale one from an earlier run is removed, so no later
stage can score it).

The reported score must be the score of the bytes that ship, never of the in-memory weights
(baseline rule, pg_mechanics.md §3.7; PR #298 logged a "roundtrip" number without evaluating the
dequantized model, seed_prs.md §2.3). So scoring starts from the file, and reading it checks, each
failure a UserError naming the file and the fix: the file exists; its sha256 matches (the expected
value given, else the sidecar written beside it); the compressed frame is complete; the container
header is valid and of a known version; every decoded tensor is finite; the state_dict fits the
freshly built model exactly (strict load). Runtime-pure: the submission script bundles it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

import torch

from pipeline.config import PackageConfig
from pipeline.errors import SizeCapError, UserError
from pipeline.export.codec import ArtifactError, build_metadata, compress, decode_artifact, encode_container, get_scheme
from pipeline.export.plan import QuantizedModel
from pipeline.fileio import atomic_write
from pipeline.model.roles import report_group

GROUPS = ("embed", "attn", "mlp", "control", "other")


def tensor_group(name: str, role: str | None) -> str:
    """Reporting group of a state_dict tensor with parameter role `role` (None: a buffer): control
    and gate tensors are "control" (wherever they sit: `blocks.0.attn.q_gain` is stored fp32 like
    every other control tensor), embeddings and the head "embed", the rest attn/mlp/other by name."""
    return report_group(name, role)


def serialize(qmodel: QuantizedModel, meta: Mapping) -> bytes:
    """The uncompressed container bytes (safetensors layout, pgolf metadata)."""
    return encode_container(qmodel.tensors, build_metadata(qmodel.manifest, dict(meta)))


def effective_level(compressor: str, level: int) -> int:
    """The level a compressor actually runs at: zlib and lrzip top out at 9, brotli at 11."""
    return min(level, {"zlib": 9, "pergroup": 9, "brotli": 11, "brotli_shuffle": 11}.get(compressor, level))


def _label(qmodel: QuantizedModel, cfg: PackageConfig) -> str:
    # e.g. "int6_int8+zstd-22", in the spirit of the records' "int6+zstd-22" log labels
    schemes = sorted({m["scheme"] for m in qmodel.manifest.values() if get_scheme(m["scheme"]).int_range})
    return f"{'_'.join(schemes) or 'fp16'}+{cfg.compressor}-{effective_level(cfg.compressor, cfg.level)}"


def group_codec(compressor: str) -> str:
    """The codec of the per-group estimate: the blob's own, but brotli for pergroup, whose lrzip
    groups are whole tensor kinds across layers rather than these report groups (and slow)."""
    return "brotli" if compressor == "pergroup" else compressor


def group_breakdown(qmodel: QuantizedModel, cfg: PackageConfig) -> dict[str, dict]:
    """Per group: tensor count, raw payload bytes, and the group's bytes compressed on their
    own with `group_codec` (an estimate: the real blob compresses all groups in one frame)."""
    out = {}
    role = {e["name"]: e.get("role") for e in qmodel.plan}
    for g in GROUPS:
        names = [n for n in qmodel.manifest if tensor_group(n, role.get(n)) == g]
        payload = b"".join(qmodel.tensors[k].contiguous().view(-1).view(torch.uint8)
                           .numpy().tobytes() for n in names for k in qmodel.entries_of(n))
        out[g] = {"tensors": len(names), "raw_bytes": len(payload),
                  "compressed_bytes": len(compress(payload, group_codec(cfg.compressor), cfg.level))
                  if payload else 0}
    return out


def package_model(qmodel: QuantizedModel, blob_path, cfg: PackageConfig, code_bytes: int,
                  meta: Mapping, group_report: bool = True, packed: bytes | None = None) -> dict:
    """Write the artifact to `blob_path` and return its accounting: bytes_model / bytes_code /
    bytes_total (bytes), cap_bytes, headroom, sha256, label, groups (see group_breakdown), plan.
    `packed`: serialize(qmodel, meta) already compressed under `cfg` by the caller (quant.fit_clip's
    last fitting trial), so a slow packer does not run twice. Raises SizeCapError over the cap (and
    removes any stale blob at `blob_path`)."""
    if not isinstance(code_bytes, int) or code_bytes < 0:
        raise UserError(f"code_bytes must be a non-negative integer, got {code_bytes!r}")
    path = Path(blob_path)
    side = path.with_name(path.name + ".sha256")
    raw = serialize(qmodel, meta)
    blob = packed if packed is not None else compress(raw, cfg.compressor, cfg.level)
    total = len(blob) + code_bytes
    if total > cfg.cap_bytes:
        for stale in (path, side):
            if stale.exists():
                stale.unlink()
        raise SizeCapError(
            f"{path} would be {len(blob):,} bytes + code {code_bytes:,} bytes = {total:,} "
            f"bytes, over the cap of {cfg.cap_bytes:,} by {total - cfg.cap_bytes:,}; use fewer "
            "parameters (layers, model_dim, mlp_mult, vocab) or a stronger quant plan "
            "(int6 instead of int8/fp16 rules in quant.rules), or package.level 22 with zstd")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(blob).hexdigest()
    if side.exists():  # never let an old checksum vouch for a new blob
        side.unlink()
    atomic_write(path, blob)
    atomic_write(side, f"{digest}  {path.name}\n".encode())
    return {
        "label": _label(qmodel, cfg), "sha256": digest,
        "bytes_model": len(blob), "bytes_code": code_bytes, "bytes_total": total,
        "bytes_raw": len(raw), "cap_bytes": cfg.cap_bytes, "headroom": cfg.cap_bytes - total,
        "compressor": cfg.compressor, "level": cfg.level,
        "groups": group_breakdown(qmodel, cfg) if group_report else {},
        "plan": qmodel.plan,
    }


def size_lines(result: dict) -> list[str]:
    """The three size lines every record prints (pg_mechanics.md §4.2.3)."""
    return [f"Serialized model {result['label']}: {result['bytes_model']} bytes",
            f"Code size: {result['bytes_code']} bytes",
            f"Total submission size {result['label']}: {result['bytes_total']} bytes"]


# --------------------------------------------------------------------------------------
# reading it back


def _sidecar_sha(blob_path: Path) -> str | None:
    side = blob_path.with_name(blob_path.name + ".sha256")
    if not side.exists():
        return None
    text = side.read_text(encoding="utf-8").split()
    return text[0].lower() if text else None


def load_artifact(blob_path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read, verify and decode `blob_path`. Returns (state_dict, meta), where meta is the
    recipe/model identity given to package_model. Raises UserError on a missing, corrupt,
    truncated or non-finite artifact."""
    path = Path(blob_path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist; re-run the export (`pgolf run` re-creates it)")
    blob = path.read_bytes()
    expected = expected_sha256 or _sidecar_sha(path)
    if expected:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected.strip().lower():
            raise UserError(f"artifact {path} checksum mismatch (sha256 {actual}, expected {expected}): "
                            "the blob is corrupted; re-run the export (`pgolf run` re-creates it)")
    try:
        state_dict, header = decode_artifact(blob)
    except ArtifactError as e:
        raise UserError(f"artifact {path}: {e}") from None
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"artifact {path}: tensor {name!r} decodes to NaN or inf; the blob cannot be "
                            "scored. Re-export from finite weights (lower the learning rates).")
    return state_dict, dict(header.get("meta") or {})


def roundtrip_into(model_factory: Callable[[], torch.nn.Module], blob_path,
                   expected_sha256: str | None = None) -> torch.nn.Module:
    """Build a fresh model and strict-load the artifact's weights into it."""
    state_dict, _ = load_artifact(blob_path, expected_sha256)
    model = model_factory()
    expected_keys = set(model.state_dict().keys())
    missing = sorted(expected_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        raise UserError(f"artifact {blob_path} does not fit the model built from the recipe: "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                        f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; export it "
                        "from this recipe, or load it with the recipe it was exported from")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatch: the message lists the offending tensors
        raise UserError(f"artifact {blob_path} does not fit the model built from the recipe "
                        f"({str(e).splitlines()[-1].strip()}); export it from this recipe, "
                        "or load it with the recipe it was exported from") from None
    return model

