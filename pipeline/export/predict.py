"""Dry-run size prediction: the artifact's bytes from tensor shapes alone (no trained weights).

    est = predict_bytes(named_shapes_of(meta_model), recipe.quant.rules, recipe.package)
    curve, cap_rms = size_vs_rms(named_shapes_of(meta_model), recipe.quant.rules, recipe.package, code_bytes)

Used by `pgolf check`; not part of the runtime the submission script bundles.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import torch

from pipeline.config import PackageConfig
from pipeline.export.artifact import _CONTROL_RE, GROUPS, tensor_group
from pipeline.export.codec import INT_RANGES, ST_TAGS, build_metadata, compress, dtype_name, quantize_tensor
from pipeline.export.plan import as_dtype, resolve_plan


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
