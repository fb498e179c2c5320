"""Package stage: write the compressed artifact, account its bytes, gate on the size cap.

Usage:
    qmodel = quantize_state_dict(model.state_dict(), recipe.quant)
    result = package_model(qmodel, out_dir, recipe.package, code_bytes=len(code_utf8),
                           meta={"recipe": recipe.name, "trunk": recipe.model.trunk})
    for line in size_lines(result): print(line)

    # before training, from shapes only (meta-device model is fine):
    est = predict_bytes(named_shapes_of(model), recipe.quant, recipe.package)

`package_model` writes `<out_dir>/model.bin` (the blob) and `model.bin.sha256`
(`sha256sum -c` format), each through a temporary name and os.replace, so a crash never
leaves a half-written artifact. The total counted against the cap is blob bytes + code
bytes (pg_mechanics.md §3.6/§4.2.3). Over the cap it raises SizeCapError and leaves no
blob behind (a stale one from an earlier run is removed, so no later stage can score it).

The container is written with the safetensors library; `pipeline.quant` reads it back by
hand at submission time (see that module for the byte layout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Mapping

import torch

from pipeline.config import CONTROL_PATTERN, PackageConfig
from pipeline.errors import SizeCapError, UserError
from pipeline.fileio import atomic_write
from pipeline.quant import ST_TAGS, INT_RANGES, build_metadata, compress, dtype_name, encode_container, quantize_tensor
from pipeline.stages.quantize import QuantizedModel, as_dtype, resolve_plan

BLOB_NAME = "model.bin"
GROUPS = ("embed", "attn", "mlp", "control", "other")
_CONTROL_RE = re.compile(CONTROL_PATTERN)
_EMBED_RE = re.compile(r"(^|\.)(tok_emb|lm_head|value_embeds)(\.|$)|bigram\.embed")
# safetensors dtype tags, to lay out the header exactly as the writer would in predict_bytes


def tensor_group(name: str) -> str:
    """Reporting group of a state_dict name. Control wins over attn/mlp because e.g.
    `blocks.0.attn.q_gain` is stored fp32 like every other control tensor."""
    if _CONTROL_RE.search(name):
        return "control"
    if _EMBED_RE.search(name):
        return "embed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "other"


def serialize(qmodel: QuantizedModel, meta: Mapping) -> bytes:
    """The uncompressed container bytes (safetensors layout, pgolf metadata)."""
    return encode_container(qmodel.tensors, build_metadata(qmodel.manifest, dict(meta)))


def _label(qmodel: QuantizedModel, cfg: PackageConfig) -> str:
    # e.g. "int6_int8+zstd-22", in the spirit of the records' "int6+zstd-22" log labels
    schemes = sorted({m["scheme"] for m in qmodel.manifest.values() if m["scheme"] in INT_RANGES})
    level = min(cfg.level, 9) if cfg.compressor == "zlib" else cfg.level
    return f"{'_'.join(schemes) or 'fp16'}+{cfg.compressor}-{level}"


def group_breakdown(qmodel: QuantizedModel, cfg: PackageConfig) -> dict[str, dict]:
    """Per group: tensor count, raw payload bytes, and the group's bytes compressed on their
    own (an estimate: the real blob compresses all groups in one frame)."""
    out = {}
    for g in GROUPS:
        names = [n for n in qmodel.manifest if tensor_group(n) == g]
        payload = b"".join(qmodel.tensors[k].contiguous().view(-1).view(torch.uint8)
                           .numpy().tobytes() for n in names for k in qmodel.entries_of(n))
        out[g] = {"tensors": len(names), "raw_bytes": len(payload),
                  "compressed_bytes": len(compress(payload, cfg.compressor, cfg.level))
                  if payload else 0}
    return out


def package_model(qmodel: QuantizedModel, out_dir: str, cfg: PackageConfig, code_bytes: int,
                  meta: Mapping, group_report: bool = True) -> dict:
    """Write the artifact and return its accounting: bytes_model / bytes_code / bytes_total,
    cap_bytes, headroom, sha256, path, label, groups (see group_breakdown), plan."""
    if not isinstance(code_bytes, int) or code_bytes < 0:
        raise UserError(f"code_bytes must be a non-negative integer, got {code_bytes!r}")
    raw = serialize(qmodel, meta)
    blob = compress(raw, cfg.compressor, cfg.level)
    total = len(blob) + code_bytes
    path = os.path.join(out_dir, BLOB_NAME)
    if total > cfg.cap_bytes:
        for stale in (path, path + ".sha256"):
            if os.path.exists(stale):
                os.remove(stale)
        raise SizeCapError(
            f"{path} would be {len(blob):,} bytes + code {code_bytes:,} bytes = {total:,} "
            f"bytes, over the cap of {cfg.cap_bytes:,} by {total - cfg.cap_bytes:,}; use fewer "
            "parameters (layers, model_dim, mlp_mult, vocab) or a stronger quant plan "
            "(int6 instead of int8/fp16 rules in quant.rules), or package.level 22 with zstd")
    os.makedirs(out_dir, exist_ok=True)
    digest = hashlib.sha256(blob).hexdigest()
    if os.path.exists(path + ".sha256"):  # never let an old checksum vouch for a new blob
        os.remove(path + ".sha256")
    atomic_write(path, blob)
    atomic_write(path + ".sha256", f"{digest}  {BLOB_NAME}\n".encode())
    return {
        "path": path, "label": _label(qmodel, cfg), "sha256": digest,
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
# dry-run size prediction


def _entry_layout(name: str, scheme: str, shape: tuple, dtype: torch.dtype):
    """[(container key, storage dtype, shape)] exactly as quantize_tensor would store it."""
    if scheme in INT_RANGES:
        scale_shape = [shape[0]] if len(shape) >= 2 else []
        dt = torch.float16 if len(shape) >= 2 else torch.float32
        return [(name + ".q", torch.int8, list(shape)), (name + ".scale", dt, scale_shape)]
    store = {"fp16": torch.float16, "fp32": torch.float32}.get(scheme, dtype)
    return [(name, store, list(shape))]


def _synth_sample(name: str, shape: tuple, dtype: torch.dtype, std: float | None,
                  gen: torch.Generator, sample_rows: int) -> torch.Tensor:
    """A Gaussian stand-in with the tensor's full row width and at most sample_rows rows
    (1-D: at most sample_rows * 1024 elements)."""
    if len(shape) >= 2:
        sshape = (min(shape[0], sample_rows), *shape[1:])
    elif len(shape) == 1:
        sshape = (min(shape[0], sample_rows * 1024),)
    else:
        sshape = ()
    noise = torch.randn(sshape, generator=gen)
    if std is not None:
        x = noise * std
    elif _CONTROL_RE.search(name):
        # Control tensors start at constants (scales 1, gains 1.5, mixes 1/0) and drift a
        # little in training; "constant-ish" = 1 + small noise, which keeps fp32's exponent
        # bytes compressible but not its mantissa, as in a trained model.
        x = 1.0 + 0.01 * noise
    else:
        x = 0.02 * noise
    return x.to(dtype)


def predict_bytes(named_shapes: Mapping[str, tuple], rules, cfg: PackageConfig,
                  init_std: Mapping[str, float] | None = None, seed: int = 0,
                  meta: Mapping | None = None, sample_rows: int = 64) -> dict[str, int]:
    """ESTIMATE of the compressed artifact size from shapes alone (no trained weights).

    Each tensor is replaced by a Gaussian sample (std init_std[name]; else 0.02, and
    1 + 0.01·N for control tensors) with full row width and at most `sample_rows` rows,
    quantized by its plan scheme. Bytes are pooled into streams by (group, storage kind),
    each stream is compressed with the configured codec, and its compressed/raw ratio is
    applied to the stream's full-size raw bytes. The container header (tensor index +
    manifest + meta) is laid out exactly and compressed on its own. Non-float tensors are
    counted uncompressed. Without a scale floor, int6/int8 codes are scaled by each row's
    own maximum and their entropy barely depends on the assumed std. With a floor (PR #684's
    1/31 and 1/127) every row with max|w| below 1 gets the same absolute step, so the code
    entropy grows with the weights' RMS: see `size_vs_rms`. Trained weights are not Gaussian
    (heavier tails, lower entropy with weight decay), so treat the result as a guide.

    Returns {group: bytes for each of GROUPS, "header": bytes, "total": bytes}."""
    init_std = dict(init_std or {})
    plan = resolve_plan(named_shapes, rules)
    gen = torch.Generator().manual_seed(int(seed))
    streams: dict[tuple[str, str], list] = {}  # (group, kind) -> [sample bytes list, full]
    fixed = dict.fromkeys(GROUPS, 0)
    manifest, index, offset = {}, {}, 0
    for entry in plan:
        name, scheme = entry["name"], entry["scheme"]
        shape, dtype = tuple(int(d) for d in named_shapes[name][0]), as_dtype(named_shapes[name][1])
        group = tensor_group(name)
        manifest[name] = {"scheme": scheme, "dtype": dtype_name(dtype), "shape": list(shape),
                          "clip_percentile": entry["clip_percentile"]}
        layout = _entry_layout(name, scheme, shape, dtype)
        for key, store, eshape in layout:
            nbytes = math.prod(eshape) * store.itemsize
            index[key] = {"dtype": ST_TAGS.get(store, "F32"), "shape": eshape,
                          "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if scheme == "raw":  # integer buffers: no model of their values, count them raw
            fixed[group] += sum(math.prod(s) * d.itemsize for _, d, s in layout)
            continue
        if math.prod(shape) == 0:
            continue
        sample = _synth_sample(name, shape, dtype, init_std.get(name), gen, sample_rows)
        parts = quantize_tensor(sample, scheme, entry["clip_percentile"], name, scale_floor=entry.get("scale_floor"))
        for key, store, eshape in layout:
            kind = "scale" if key.endswith(".scale") and scheme in INT_RANGES else dtype_name(store)
            stream = streams.setdefault((group, kind), [[], 0])
            stream[0].append(parts[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            stream[1] += math.prod(eshape) * store.itemsize
    out = dict(fixed)
    for (group, _kind), (chunks, full) in streams.items():
        sample_bytes = b"".join(chunks)
        if sample_bytes:
            ratio = len(compress(sample_bytes, cfg.compressor, cfg.level)) / len(sample_bytes)
            out[group] += int(round(ratio * full))
    header = json.dumps({"__metadata__": build_metadata(manifest, dict(meta or {})), **index},
                        separators=(",", ":")).encode()
    out["header"] = len(compress(header, cfg.compressor, cfg.level)) + 8
    out["total"] = sum(out.values())
    return out


def size_vs_rms(named_shapes: Mapping[str, tuple], rules, cfg: PackageConfig, code_bytes: int,
                grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3), sample_rows: int = 16,
                bisect_steps: int = 4) -> tuple[list[tuple[float, int]], float | None]:
    """Predicted total bytes with every int6/int8 tensor at RMS r, for r in `grid`, and the RMS
    at which the total reaches the cap (None when no grid value reaches it).

    Under a scale floor the artifact size is set by how large the trained weights grow (PR
    #1218 measured compressed size tracking a matrix's RMS with R^2 ~ 0.99), which a dry run
    cannot know; this tells the user the largest trained RMS that still fits, to compare with
    a checkpoint's. The crossing is found by bisection in log-RMS between the bracketing grid
    points (the size rises monotonically with the RMS). 16 sample rows keep each evaluation
    to a fraction of a second and agree with 64 rows to within ~0.2 % (sidecar48)."""
    plan = resolve_plan(named_shapes, rules)
    quantized = [e["name"] for e in plan if e["scheme"] in INT_RANGES]

    def total_at(rms: float) -> int:
        est = predict_bytes(named_shapes, rules, cfg, init_std=dict.fromkeys(quantized, rms),
                            sample_rows=sample_rows)
        return est["total"] + code_bytes

    curve = [(r, total_at(r)) for r in grid]
    over = [i for i, (_, total) in enumerate(curve) if total > cfg.cap_bytes]
    if not over:
        return curve, None
    if over[0] == 0:
        return curve, grid[0]
    lo, hi = math.log(grid[over[0] - 1]), math.log(grid[over[0]])
    for _ in range(bisect_steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_at(math.exp(mid)) <= cfg.cap_bytes else (lo, mid)
    return curve, math.exp((lo + hi) / 2)
