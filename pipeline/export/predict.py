"""Dry-run size prediction: the artifact's bytes from tensor shapes alone (no trained weights).

    roles = param_roles(meta_model)  # pipeline.model.roles
    est = predict_bytes(named_shapes_of(meta_model), recipe.quant.rules, recipe.package, roles=roles)
    curve, cap_rms = size_vs_rms(named_shapes_of(meta_model), recipe.quant.rules, recipe.package, code_bytes,
                                 roles=roles)

Tensor layouts come from each scheme's `layout` (pipeline.export.codec), the same one the
encoder and the reader use, so a new scheme is predicted without a change here; a calibrating
scheme (GPTQ) encodes its stand-ins with its `stand_in` calibration. Given a whole QuantConfig with
`lqer`, the top_k largest candidates stand for the tensors LQER will repair (which ones it picks
depends on the trained weights' errors, which a dry run cannot know).

Used by `pgolf check`; not part of the runtime the submission script bundles.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import torch

from pipeline.config import PackageConfig, QuantConfig
from pipeline.export.artifact import GROUPS, group_codec, tensor_group
from pipeline.export.codec import (SCHEMES, ST_TAGS, build_metadata, compress, dtype_name, encode_container, get_scheme,
                                   quantize_tensor)
from pipeline.export.plan import as_dtype, resolve_plan
from pipeline.model.roles import CONTROL_ROLES

WHOLE_MODEL_ELEMENTS = 1 << 22  # up to this many elements a model's stand-ins are packed whole (a second or so)


def _synth_sample(role: str | None, shape: tuple, dtype: torch.dtype, std: float | None,
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
    elif role in CONTROL_ROLES:
        # Control tensors start at constants (scales 1, gains 1.5, mixes 1/0) and drift a
        # little in training; "constant-ish" = 1 + small noise, which keeps fp32's exponent
        # bytes compressible but not its mantissa, as in a trained model.
        x = 1.0 + 0.01 * noise
    else:
        x = 0.02 * noise
    return x.to(dtype)


def predict_bytes(named_shapes: Mapping[str, tuple], rules, cfg: PackageConfig,
                  init_std: Mapping[str, float] | None = None, seed: int = 0,
                  meta: Mapping | None = None, sample_rows: int = 64,
                  roles: Mapping[str, str] | None = None) -> dict[str, int]:
    """ESTIMATE of the compressed artifact size from shapes alone (no trained weights).

    Each tensor is replaced by a Gaussian sample (std init_std[name]; else 0.02, and
    1 + 0.01·N for control and gate roles) with full row width and at most `sample_rows` rows,
    quantized by its plan scheme. Bytes are pooled into streams by (group, storage kind),
    each stream is compressed with the configured codec, and its compressed/raw ratio is
    applied to the stream's full-size raw bytes. The container header (tensor index +
    manifest + meta) is laid out exactly and compressed on its own. Non-float tensors are
    counted uncompressed. A model of at most WHOLE_MODEL_ELEMENTS elements (not under pergroup)
    is predicted whole instead: full-size stand-ins packed as the blob is, the groups rescaled to
    their shares of it. Without a scale floor, int6/int8 codes are scaled by each row's
    own maximum and their entropy barely depends on the assumed std. With a floor (PR #684's
    1/31 and 1/127) every row with max|w| below 1 gets the same absolute step, so the code
    entropy grows with the weights' RMS: see `size_vs_rms`. Trained weights are not Gaussian;
    under SD-clip or a row-max scale, any row distribution of the same variance has at most the
    Gaussian's entropy, so trained codes tend to take fewer bytes (tests/test_clip_fit.py); treat
    the result as a guide.

    Returns {group: bytes for each of GROUPS, "header": bytes, "total": bytes}."""
    init_std = dict(init_std or {})
    plan = _with_lqer(resolve_plan(named_shapes, rules, roles), rules, named_shapes)
    # A small model is predicted whole: its stand-ins at full size, laid out and packed exactly as the
    # blob, because one compressed stream over tensors smaller than the compressor's blocks costs more
    # than each group alone (measured ~8% on a 0.7M-parameter int6/int8 SD-clip plan under zstd-22;
    # within 0.3% at sidecar48's size). pergroup packs groups apart, as the pooled estimate does.
    whole = cfg.compressor != "pergroup" and \
        sum(math.prod(int(d) for d in named_shapes[e["name"]][0]) for e in plan) <= WHOLE_MODEL_ELEMENTS
    if whole:
        sample_rows = 1 << 62
    tensors: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(int(seed))
    streams: dict[tuple[str, str], list] = {}  # (group, kind) -> [sample bytes list, full]
    fixed = dict.fromkeys(GROUPS, 0)
    manifest, index, offset = {}, {}, 0
    for entry in plan:
        name, scheme = entry["name"], entry["scheme"]
        shape, dtype = tuple(int(d) for d in named_shapes[name][0]), as_dtype(named_shapes[name][1])
        group = tensor_group(name, entry["role"])
        manifest[name] = {"scheme": scheme, "dtype": dtype_name(dtype), "shape": list(shape),
                          "clip_percentile": entry["clip_percentile"]}
        if entry.get("clip_sigmas") is not None:  # as plan.quantize_state_dict writes it
            manifest[name]["clip_sigmas"] = entry["clip_sigmas"]
        spec = get_scheme(scheme)
        layout = spec.layout(name, shape, dtype)
        for key, store, eshape, _stream in layout:
            nbytes = math.prod(eshape) * store.itemsize
            index[key] = {"dtype": ST_TAGS.get(store, "F32"), "shape": eshape,
                          "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if scheme == "raw":  # integer buffers: no model of their values, count them raw
            fixed[group] += sum(math.prod(e.shape) * e.dtype.itemsize for e in layout)
            tensors.update({key: torch.zeros(eshape, dtype=store) for key, store, eshape, _ in layout})
            continue
        if math.prod(shape) == 0:
            continue
        sample = _synth_sample(entry["role"], shape, dtype, init_std.get(name), gen, sample_rows)
        stand_in = spec.stand_in(sample.shape) if spec.stand_in is not None else None
        parts = quantize_tensor(sample, scheme, entry["clip_percentile"], name, scale_floor=entry.get("scale_floor"),
                                calibration=stand_in, clip_sigmas=entry.get("clip_sigmas"))
        if whole:
            tensors.update(parts)
        for key, store, eshape, kind in layout:
            stream = streams.setdefault((group, kind), [[], 0])
            stream[0].append(parts[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            stream[1] += math.prod(eshape) * store.itemsize
    out = dict(fixed)
    for (group, _kind), (chunks, full) in streams.items():
        sample_bytes = b"".join(chunks)
        if sample_bytes:
            ratio = len(compress(sample_bytes, group_codec(cfg.compressor), cfg.level)) / len(sample_bytes)
            out[group] += int(round(ratio * full))
    header = json.dumps({"__metadata__": build_metadata(manifest, dict(meta or {})), **index},
                        separators=(",", ":")).encode()
    out["header"] = len(compress(header, group_codec(cfg.compressor), cfg.level)) + 8
    if whole:  # the exact blob of the stand-ins; the groups keep their shares of it
        exact = len(compress(encode_container(tensors, build_metadata(manifest, dict(meta or {}))),
                             cfg.compressor, cfg.level))
        _rescale(out, exact, fixed)
    out["total"] = sum(out.values())
    return out


def _rescale(out: dict[str, int], exact: int, fixed: Mapping[str, int]) -> None:
    """Scale the compressed part of each group in `out` (its bytes less `fixed` raw ones) so that
    the groups and the header add up to `exact`; the rounding rest goes to the largest group."""
    packed = {g: out[g] - fixed[g] for g in GROUPS}
    target = exact - out["header"] - sum(fixed.values())
    if sum(packed.values()) <= 0 or target <= 0:
        return
    factor = target / sum(packed.values())
    for g in GROUPS:
        out[g] = fixed[g] + int(round(packed[g] * factor))
    largest = max(GROUPS, key=lambda g: packed[g])
    out[largest] += exact - out["header"] - sum(out[g] for g in GROUPS)


def _with_lqer(plan: list[dict], rules, named_shapes: Mapping[str, tuple]) -> list[dict]:
    """The plan with LQER's stand-in targets renamed to their repaired scheme: the top_k candidates
    by size (two or more dims, an integer scheme), ties by name."""
    lqer = rules.lqer if isinstance(rules, QuantConfig) else None
    if lqer is None:
        return plan
    from pipeline.export import lqer as lqer_mod

    manifest = {e["name"]: {"scheme": e["scheme"], "shape": [int(d) for d in named_shapes[e["name"]][0]]}
                for e in plan}
    chosen = sorted(lqer_mod.candidates(manifest), key=lambda n: (-math.prod(manifest[n]["shape"]), n))[:lqer.top_k]
    return [e | {"scheme": lqer_mod.derived_name(e["scheme"], lqer.rank)} if e["name"] in chosen else e for e in plan]


def model_figures(model: torch.nn.Module, rules, cfg: PackageConfig) -> dict[str, int]:
    """What `pgolf check` prints about the model itself, in its order: params=, params_<scheme>=
    (elements per plan scheme), predicted_bytes_<group>= (and header) and predicted_bytes_model=.
    `model` may live on the meta device; the plan reads its parameters' declared roles. `rules`: a
    whole QuantConfig (as `check` passes it) also predicts its LQER factors."""
    from pipeline.export.plan import named_shapes_of
    from pipeline.model.roles import param_roles

    shapes, roles = named_shapes_of(model), param_roles(model)
    out = {"params": sum(p.numel() for p in model.parameters())}
    schemes: dict[str, int] = {}
    for row in resolve_plan(shapes, rules, roles):
        schemes[row["scheme"]] = schemes.get(row["scheme"], 0) + row["numel"]
    out |= {f"params_{scheme}": n for scheme, n in sorted(schemes.items())}
    pred = predict_bytes(shapes, rules, cfg, roles=roles)
    out |= {f"predicted_bytes_{group}": n for group, n in sorted(pred.items()) if group != "total"}
    out["predicted_bytes_model"] = pred["total"]
    return out


def size_vs_rms(named_shapes: Mapping[str, tuple], rules, cfg: PackageConfig, code_bytes: int,
                grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3), sample_rows: int = 16,
                bisect_steps: int = 4, roles: Mapping[str, str] | None = None
                ) -> tuple[list[tuple[float, int]], float | None]:
    """Predicted total bytes with every int6/int8 tensor at RMS r, for r in `grid`, and the RMS
    at which the total reaches the cap (None when no grid value reaches it).

    Under a scale floor the artifact size is set by how large the trained weights grow (PR
    #1218 measured compressed size tracking a matrix's RMS with R^2 ~ 0.99), which a dry run
    cannot know; this tells the user the largest trained RMS that still fits, to compare with
    a checkpoint's. The crossing is found by bisection in log-RMS between the bracketing grid
    points (the size rises monotonically with the RMS). 16 sample rows keep each evaluation
    to a fraction of a second and agree with 64 rows to within ~0.2 % (sidecar48)."""
    plan = resolve_plan(named_shapes, rules, roles)
    quantized = [e["name"] for e in plan if SCHEMES[e["scheme"]].int_range]

    def total_at(rms: float) -> int:
        est = predict_bytes(named_shapes, rules, cfg, init_std=dict.fromkeys(quantized, rms),
                            sample_rows=sample_rows, roles=roles)
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
