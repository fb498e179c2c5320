"""Runtime-pure quantization math and artifact reader for the "pgolf-quant" format, v1.

What is here: the registry of quantization schemes (`SCHEMES`; built in: int5 / int6 / int7 /
int8 per row, fp16 / fp32 casts, exact "raw" pass-through for non-float tensors), the two codecs
(zstd, zlib), and a hand-written parser of the artifact container, ending in `decode_artifact`,
which turns a blob back into a state_dict.

Schemes and compressors that only some recipes use live in their own modules, which this one
imports by name when a rule, a plan or a blob needs them (`extension`, `get_scheme`): GPTQ
(gptq5..gptq8, pipeline/export/gptq.py), LQER (derived "<scheme>+lqer<r>" names, lqer.py, resolved
through `RESOLVERS`), and the brotli, brotli_shuffle and pergroup packagers (packagers.py). The
generated script carries only those its recipe uses (pipeline.codegen.export_modules).

A scheme is one `Scheme` in one place: `encode` (tensor -> container entries), `decode` (entries
-> tensor), `layout` (the entries' keys, storage dtypes and shapes from the tensor's shape alone:
what the size predictor lays out and what the reader expects), whether recipe rules may clip it,
and an optional `calibrate(model, batches)` hook. A scheme that declares `calibrate` gets, at the
end of training and inside the training time budget (the train stage runs and times it, and
counts it in train_time_s: the records' GPTQ reserve, pg_mechanics.md §4.1.4), the trained model
and a stream of training batches; what it returns ({tensor name: tensor}) reaches its `encode`
as `calibration` for that tensor when the export stage quantizes (pipeline.export.calibration).
Register one with `register_scheme(Scheme(...))` in a module the runtime imports (or one named in
EXTENSION_MODULES); recipes name it in `quant.rules` and the recipe loader checks the name against
this registry. A calibrating scheme also gives `stand_in(shape)`, the calibration the size
predictor hands its encoder in place of real statistics.

Why it stands alone: the submission's self-contained `train_gpt.py` must read and
dequantize the artifact with only the standard library, torch, numpy and zstandard, so this
module imports nothing else. (Its one optional import, `pipeline.errors`, only makes the
reader's errors `UserError`s inside the package; bundled, they are plain `ValueError`s.)
Loading never executes code: no pickle anywhere, only JSON and raw little-endian bytes.

The blob is one standard zstd frame (with content size and checksum) or a zlib stream (or,
from packagers.py, a brotli stream or a per-group pack), wrapping a safetensors-compatible
container: an 8-byte little-endian header length, a JSON
header `{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`, then the
raw tensor bytes, written and parsed here by hand (the safetensors library reads the same bytes,
tested). Entries are `<name>.q` (int8 codes) plus
`<name>.scale` (fp16 per row; one fp32 scalar for 1-D tensors) for the integer schemes (GPTQ's
too), and `<name>` for fp16/fp32/raw. `__metadata__["pgolf_quant"]` is a JSON string:
`{"format": "pgolf-quant", "version": 1, "tensors": {name: {"scheme", "dtype", "shape",
"clip_percentile"[, "clip_sigmas"]}}, "meta": {...the recipe/model identity the packager was
given...}}` ("clip_sigmas" only where a rule set it).

Scheme math (PR #684's export, seed_prs.md §3.2; PR #298 / baseline int8, §2.3):
  int6: per row, scale = max|w_row| / 31 stored fp16, q = clamp(round(w / scale), -32, 31).
  int8: per row, clip c = quantile(|w_row|, p) (row max when p is None), scale = c / 127
        stored fp16, q = clamp(round(clamp(w, -c, c) / scale), -127, 127).
  int5 / int7: as int8 with qmax 15 / 63 (symmetric, the records' 2**(bits-1) - 1, §4.1.1).
  SD-clip (`clip_sigmas` k, PR #1394, §4.1.4), any integer scheme: c = k * std(w_row).
  N-D tensors are viewed as [shape[0], -1]; 1-D and 0-D tensors get one fp32 scale.

Usage, submission side:
    state_dict, header = decode_artifact(open("model.bin", "rb").read())
    model.load_state_dict(state_dict, strict=True)
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import zlib
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import zstandard

try:  # inside the package: reader errors are user errors (printed without a traceback)
    from pipeline.errors import UserError as _ErrorBase
except ImportError:  # bundled into the self-contained submission script
    _ErrorBase = ValueError

FORMAT_NAME = "pgolf-quant"
FORMAT_VERSION = 1
METADATA_KEY = "pgolf_quant"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Dtype tags of the safetensors header -> little-endian numpy dtype. BF16 has no numpy
# type, so it is read as uint16 and reinterpreted by torch.
_NP_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


class ArtifactError(_ErrorBase):
    """The artifact cannot be read: corrupt, truncated, or not a pgolf-quant blob."""


class StorageRangeError(_ErrorBase):
    """A value or scale does not fit the storage type its scheme would write (it would become inf)."""


# --------------------------------------------------------------------------------------
# scheme math


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.float32' -> 'float32' (how dtypes are written in the header)."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ArtifactError(f"artifact header names an unknown dtype {name!r}; "
                            "the blob is corrupt or from an incompatible writer")
    return dt


def container_keys(name: str, scheme: str) -> list[str]:
    """The container entries one state_dict tensor becomes under `scheme` (the keys of its layout,
    which never depend on the shape)."""
    return [e.key for e in get_scheme(scheme).layout(name, (1, 1), torch.float32)]


def row_quantile(a: torch.Tensor, q: float, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Per-row linear-interpolated quantile of a 2-D tensor (torch.quantile's definition).

    Hand-rolled on sort because torch.quantile refuses inputs over 2**24 elements; rows are
    processed in chunks so the sort's index tensor stays bounded in memory."""
    rows, cols = a.shape
    pos = q * (cols - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, cols - 1)
    frac = pos - lo
    step = max(1, chunk_elems // max(cols, 1))
    out = []
    for start in range(0, rows, step):
        s = a[start:start + step].sort(dim=1).values
        out.append(torch.lerp(s[:, lo], s[:, hi], frac))
    return torch.cat(out) if out else a.new_zeros(0)


def row_clip(w2: torch.Tensor, clip_percentile: float | None, clip_sigmas: float | None) -> torch.Tensor:
    """Per-row clip of a [rows, cols] tensor: the row max, its `clip_percentile` percentile of |w|,
    or SD-clip's `clip_sigmas` standard deviations of the row (PR #1394, pg_mechanics.md §4.1.4)."""
    if w2.shape[1] == 0:
        return w2.new_zeros(w2.shape[0])
    if clip_sigmas is not None:
        # the records' torch.std (Bessel-corrected); a one-column row has no spread to correct
        return float(clip_sigmas) * w2.std(dim=1, correction=1 if w2.shape[1] > 1 else 0)
    a = w2.abs()
    return a.amax(dim=1) if clip_percentile is None else row_quantile(a, clip_percentile / 100.0)


def scales_from_clip(clip: torch.Tensor, qmax: int, per_row: bool, scale_floor: float | None, scheme: str,
                     name: str) -> torch.Tensor:
    """Storage scales clip / qmax: fp16 per row, or one fp32 scalar (1-D and 0-D tensors)."""
    # By default scales are floored at the smallest *normal* value of their storage dtype:
    # zero rows survive (q = 0), and a floored fp16 scale keeps full relative precision, so
    # the |error| <= scale/2 bound holds for every row. The records floor at 1/qmax instead
    # (scale_floor=1/31 or 1/127), which gives rows with max|w| < 1 a coarse absolute step;
    # pass that to reproduce their bytes exactly.
    scale_dtype = torch.float16 if per_row else torch.float32
    floor = torch.finfo(scale_dtype).tiny if scale_floor is None else float(scale_floor)
    scale = (clip / qmax).clamp_min(floor).to(scale_dtype)
    if not bool(torch.isfinite(scale).all()):
        worst = float(clip.max())
        raise StorageRangeError(
            f"tensor {name!r}: a row's {scheme} scale ({worst:.4g} / {qmax}) overflows {dtype_name(scale_dtype)} "
            f"(max {torch.finfo(scale_dtype).max:.6g}); the weights are far too large (training diverged: lower the "
            f"learning rates) or store this tensor as fp32 with a quant rule")
    return scale


def _quantize_int(t: torch.Tensor, scheme: str, clip_percentile: float | None,
                  scale_floor: float | None = None, name: str = "tensor", clip_sigmas: float | None = None):
    qmin, qmax = SCHEMES[scheme].int_range
    w = t.detach().float()
    per_row = w.ndim >= 2
    w2 = w.reshape(w.shape[0], -1) if per_row else w.reshape(1, -1)
    clip = row_clip(w2, clip_percentile, clip_sigmas)
    scale = scales_from_clip(clip, qmax, per_row, scale_floor, scheme, name)
    # Codes are computed against the *stored* (rounded) scale, so dequantization error is
    # bounded by half of the scale actually used at load time.
    s = scale.float().unsqueeze(1)
    clipped = torch.maximum(torch.minimum(w2, clip.unsqueeze(1)), -clip.unsqueeze(1))
    q = torch.round(clipped / s).clamp_(qmin, qmax).to(torch.int8).reshape(t.shape)
    return q.contiguous(), (scale if per_row else scale.reshape(())).contiguous()


def quantize_tensor(t: torch.Tensor, scheme: str, clip_percentile: float | None = None,
                    name: str = "tensor", scale_floor: float | None = None, calibration=None,
                    clip_sigmas: float | None = None) -> dict[str, torch.Tensor]:
    """Encode one tensor; returns {container key: tensor} (fresh, contiguous storage).
    `scale_floor`, `clip_sigmas` (integer schemes only): lower bound of the scale and SD-clip, see
    row_clip / scales_from_clip. `calibration`: what the scheme's `calibrate` hook returned for this
    tensor (None without one)."""
    spec = get_scheme(scheme)
    if spec is None:
        raise ValueError(f"unknown quant scheme {scheme!r} for {name}; expected one of {tuple(SCHEMES)}")
    # SD-clip is passed only when set, so an encoder written before it existed still works
    extra = {} if clip_sigmas is None else {"clip_sigmas": clip_sigmas}
    return spec.encode(t, name=name, clip_percentile=clip_percentile, scale_floor=scale_floor,
                       calibration=calibration, **extra)


def dequantize_tensor(entries: dict[str, torch.Tensor], name: str, scheme: str,
                      dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Decode one tensor from its container entries back to its original dtype and shape."""
    shape = [int(d) for d in shape]
    spec = get_scheme(scheme)
    if spec is None:
        raise ArtifactError(f"artifact tensor {name!r} has unknown scheme {scheme!r}; "
                            "it was written by an incompatible pgolf, re-run `pgolf run`")
    for e in spec.layout(name, tuple(shape), dtype):
        if e.key not in entries:
            raise ArtifactError(f"artifact is missing entry {e.key!r} for tensor {name!r}; "
                                "the blob is corrupt, re-run `pgolf run`")
        if entries[e.key].numel() != math.prod(e.shape):
            raise ArtifactError(f"artifact tensor {name!r}: entry {e.key!r} has {entries[e.key].numel()} elements, "
                                f"header shape {shape} needs {math.prod(e.shape)}; the blob is corrupt, "
                                "re-run `pgolf run`")
    return spec.decode(entries, name, dtype, shape)


# --------------------------------------------------------------------------------------
# the scheme registry


class Entry(NamedTuple):
    """One container entry of a scheme's layout."""

    key: str
    dtype: torch.dtype  # storage dtype
    shape: list[int]
    stream: str  # the size predictor pools entries of one stream kind per report group


class Scheme(NamedTuple):  # a NamedTuple, not a dataclass: this module also loads outside sys.modules
    """A quantization scheme. `encode(t, *, name, clip_percentile, scale_floor, calibration)` ->
    {key: tensor}; `decode(entries, name, dtype, shape)` -> tensor; `layout(name, shape, dtype)`
    -> [Entry] exactly as encode stores them; `calibrate(model, batches)` -> {tensor name:
    tensor}, optional (see the module docstring for when it runs)."""

    name: str
    encode: Callable
    decode: Callable
    layout: Callable
    int_range: Optional[tuple[int, int]] = None  # integer codes in [lo, hi] with per-row scales
    takes_clip: bool = False  # a rule may set clip_percentile and scale_floor
    selectable: bool = True  # a recipe rule may name it ("raw" is for non-float tensors only)
    calibrate: Optional[Callable] = None
    # stand_in(shape) -> what `calibrate` would give a tensor of that shape, handed to `encode` where
    # no calibration was gathered: the size predictor's Gaussian stand-ins, layout checks.
    stand_in: Optional[Callable] = None


SCHEMES: dict[str, Scheme] = {}
# Scheme families whose names are derived (LQER's "<base>+lqer<r>"): name -> Scheme or None.
RESOLVERS: list[Callable] = []
# Schemes and packagers that live in their own modules, imported by name only when a recipe or a blob
# needs them: the generated script carries just its recipe's (pipeline.codegen), and the import
# scanner that decides what ships reads import statements, not these strings.
LQER_MODULE = "pipeline.export.lqer"
CLIP_FIT_MODULE = "pipeline.export.clip_fit"  # quant.fit_clip
EXTENSION_MODULES = ("pipeline.export.gptq", LQER_MODULE)
PACKAGER_MODULE = "pipeline.export.packagers"


def extension(module: str):
    """Import one of this package's optional runtime modules; a generated script that does not
    carry it (its recipe does not use it) raises ArtifactError naming it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ArtifactError(f"{module} is not part of this script (its recipe does not use it), but this "
                            "artifact or plan needs it; generate the script from the recipe that made it") from None


def _load_extensions() -> None:
    for module in EXTENSION_MODULES:
        try:
            extension(module)
        except ArtifactError:
            pass  # not shipped with this script: its recipe names none of its schemes


def get_scheme(name: str) -> Optional[Scheme]:
    """The registered scheme `name` (loading the extension modules and asking the resolvers of
    derived names first when it is not registered yet), or None."""
    if name not in SCHEMES:
        _load_extensions()
        for resolve in RESOLVERS:
            scheme = resolve(name)
            if scheme is not None:
                register_scheme(scheme)
                break
    return SCHEMES.get(name)


def register_scheme(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"quant scheme {scheme.name!r} registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


def selectable_schemes() -> list[str]:
    _load_extensions()
    return [n for n, s in SCHEMES.items() if s.selectable]


def int_decode(entries, name, dtype, shape):
    """Per-row integer codes times their scale (every integer scheme's decoder)."""
    q, scale = entries[name + ".q"], entries[name + ".scale"]
    rows = shape[0] if len(shape) >= 2 else 1
    w = q.float().reshape(rows, -1) * scale.float().reshape(rows, 1)
    return w.reshape(shape).to(dtype)


def int_layout(name, shape, dtype):
    # N-D tensors get one fp16 scale per row (dim 0); 1-D and 0-D tensors one fp32 scalar.
    per_row = len(shape) >= 2
    return [Entry(name + ".q", torch.int8, list(shape), "int8"),
            Entry(name + ".scale", torch.float16 if per_row else torch.float32,
                  [shape[0]] if per_row else [], "scale")]


def _int_scheme(scheme_name: str, qmin: int, qmax: int) -> Scheme:
    def encode(t, *, name, clip_percentile=None, scale_floor=None, calibration=None, clip_sigmas=None):
        q, scale = _quantize_int(t, scheme_name, clip_percentile, scale_floor, name, clip_sigmas)
        return {name + ".q": q, name + ".scale": scale}

    return Scheme(scheme_name, encode, int_decode, int_layout, int_range=(qmin, qmax), takes_clip=True)


def _cast_scheme(scheme_name: str, store: Optional[torch.dtype], selectable: bool = True) -> Scheme:
    """A plain cast to `store` (None: keep the dtype, bit-exact)."""

    def encode(t, *, name, clip_percentile=None, scale_floor=None, calibration=None):
        if store == torch.float16:
            half_max = torch.finfo(torch.float16).max
            if t.numel() and float(t.detach().abs().max()) > half_max:
                raise StorageRangeError(
                    f"tensor {name!r} holds {float(t.detach().abs().max()):.6g}, beyond fp16's range (max "
                    f"{half_max:.6g}), so storing it fp16 would write inf; lower the learning rates, or give it an "
                    "fp32 quant rule")
        out = t.detach() if store is None else t.detach().to(store)
        return {name: out.clone().contiguous()}

    def decode(entries, name, dtype, shape):
        return entries[name].reshape(shape).to(dtype)

    def layout(name, shape, dtype):
        kept = dtype if store is None else store
        return [Entry(name, kept, list(shape), dtype_name(kept))]

    return Scheme(scheme_name, encode, decode, layout, selectable=selectable)


# int6 keeps #684's asymmetric [-32, 31]; with the row-max scale the codes only ever reach ±31,
# the -32 is just the clamp #684 used.
register_scheme(_int_scheme("int6", -32, 31))
register_scheme(_int_scheme("int8", -127, 127))
register_scheme(_cast_scheme("fp16", torch.float16))
register_scheme(_cast_scheme("fp32", torch.float32))
register_scheme(_cast_scheme("raw", None, selectable=False))
# int5 (PR #1260 line's MLP matrices) and int7 (the 04-14 record's EMBED_BITS=7 embedding) are symmetric,
# clip_range = 2**(bits-1) - 1 as every record after 03-22 (pg_mechanics.md §4.1.1).
register_scheme(_int_scheme("int5", -15, 15))
register_scheme(_int_scheme("int7", -63, 63))
# Integer code range of the built-in integer schemes (kept for readers of the ranges).
INT_RANGES = {n: s.int_range for n, s in SCHEMES.items() if s.int_range}


# --------------------------------------------------------------------------------------
# codecs


def compress(raw: bytes, compressor: str = "zstd", level: int = 22) -> bytes:
    """One standard zstd frame (content size + checksum, single-threaded so the bytes are
    deterministic), or a zlib stream. zlib tops out at level 9, so a zstd-style level above
    9 (e.g. the default 22) means 9 — PR #298's and the baseline's zlib-9. brotli, brotli_shuffle
    and pergroup live in pipeline/export/packagers.py (shipped only to recipes that use them)."""
    if compressor == "zstd":
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                        write_content_size=True)
        return cctx.compress(raw)
    if compressor == "zlib":
        return zlib.compress(raw, min(int(level), 9))
    if compressor in ("brotli", "brotli_shuffle", "pergroup"):
        return extension(PACKAGER_MODULE).compress(raw, compressor, level)
    raise ValueError(f"unknown compressor {compressor!r}; expected zstd, zlib, brotli, brotli_shuffle or pergroup")


def decompress(blob: bytes) -> bytes:
    """Inverse of `compress`; the codec is recognised from the first bytes of the blob: the zstd
    magic, a zlib header, the `PGRP` magic of a per-group pack, else a brotli stream (written with
    a 2**24 window, whose first byte can never pass the zlib header check)."""
    if blob[:4] == ZSTD_MAGIC:
        try:
            return zstandard.ZstdDecompressor().decompress(blob)
        except zstandard.ZstdError as e:
            raise ArtifactError(f"artifact zstd frame is truncated or corrupt ({e}); "
                                "re-run `pgolf run`") from None
    if len(blob) >= 2 and blob[0] & 0x0F == 8 and (blob[0] * 256 + blob[1]) % 31 == 0:
        try:
            return zlib.decompress(blob)
        except zlib.error as e:
            raise ArtifactError(f"artifact zlib stream is truncated or corrupt ({e}); "
                                "re-run `pgolf run`") from None
    what = ("artifact is neither a zstd frame nor a zlib stream (bad magic bytes "
            f"{bytes(blob[:4]).hex() or 'none: empty file'})")
    try:
        packagers = extension(PACKAGER_MODULE)
    except ArtifactError:  # a zstd/zlib recipe's script carries no other reader
        raise ArtifactError(f"{what}; re-run `pgolf run`") from None
    return packagers.decompress(blob, what)


# --------------------------------------------------------------------------------------
# container


def build_metadata(manifest: dict, meta: dict) -> dict[str, str]:
    """The container's `__metadata__` map. Sorted, compact JSON: same input, same bytes."""
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": manifest, "meta": meta}
    return {METADATA_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}


ST_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}


def encode_container(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Safetensors-layout bytes (8-byte little-endian header length, JSON header with
    `__metadata__`, then each tensor's raw little-endian data), written without the
    safetensors library so the submission script needs none. Tensors are laid out in name
    order and the header is padded with spaces to 8 bytes, so the same input gives the same
    bytes; the safetensors library reads the result (tested)."""
    header: dict = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in ST_TAGS:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the container cannot hold")
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": ST_TAGS[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def parse_container(buf: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors-compatible bytes into ({name: tensor}, metadata) without the
    safetensors library. Every offset and size is checked before any byte is read."""
    if len(buf) < 8:
        raise ArtifactError(f"artifact container is {len(buf)} bytes, too short for a "
                            "header; the blob is corrupt, re-run `pgolf run`")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > len(buf) - 8:
        raise ArtifactError(f"artifact header claims {hlen} bytes but only {len(buf) - 8} "
                            "follow; the blob is truncated, re-run `pgolf run`")
    try:
        header = json.loads(bytes(buf[8:8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"artifact header is not valid JSON ({e}); "
                            "the blob is corrupt, re-run `pgolf run`") from None
    if not isinstance(header, dict):
        raise ArtifactError("artifact header is not a JSON object; the blob is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ArtifactError("artifact __metadata__ is not a string map; the blob is corrupt")
    base, data_len = 8 + hlen, len(buf) - 8 - hlen
    tensors = {}
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            np_dtype = np.dtype(_NP_DTYPES[tag])
            shape = [int(d) for d in shape]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"artifact header entry {name!r} is malformed ({info!r}); "
                                "the blob is corrupt, re-run `pgolf run`") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not (0 <= begin <= end <= data_len) \
                or end - begin != numel * np_dtype.itemsize:
            raise ArtifactError(f"artifact tensor {name!r} has offsets [{begin}, {end}) that "
                                f"do not fit shape {shape} {tag} in {data_len} data bytes; "
                                "the blob is corrupt or truncated, re-run `pgolf run`")
        arr = np.frombuffer(buf, dtype=np_dtype, count=numel, offset=base + begin) \
            if numel else np.empty(0, dtype=np_dtype)
        # copy: the result must own writable memory, not alias the (read-only) blob
        t = torch.from_numpy(arr.reshape(shape).copy())
        tensors[name] = t.view(torch.bfloat16) if tag == "BF16" else t
    return tensors, metadata


def read_header(metadata: dict[str, str]) -> dict:
    """The pgolf header from a container's metadata; refuses other formats and newer versions."""
    if METADATA_KEY not in metadata:
        raise ArtifactError(f"artifact has no {METADATA_KEY!r} metadata: it is not a "
                            f"{FORMAT_NAME} blob; re-run `pgolf run`")
    try:
        doc = json.loads(metadata[METADATA_KEY])
        fmt, version, manifest = doc["format"], doc["version"], doc["tensors"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"artifact {METADATA_KEY!r} metadata is malformed; "
                            "the blob is corrupt, re-run `pgolf run`") from None
    if fmt != FORMAT_NAME:
        raise ArtifactError(f"artifact format is {fmt!r}, expected {FORMAT_NAME!r}; "
                            "this reader cannot load it")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"artifact is {FORMAT_NAME} version {version}, this reader "
                            f"understands up to version {FORMAT_VERSION}; upgrade pgolf "
                            "or re-package with this version")
    if not isinstance(manifest, dict):
        raise ArtifactError("artifact tensor manifest is malformed; the blob is corrupt")
    return doc


def decode_container(buf: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Uncompressed container bytes -> (state_dict in original dtypes, pgolf header)."""
    entries, metadata = parse_container(buf)
    doc = read_header(metadata)
    state_dict, used = {}, set()
    for name, spec in doc["tensors"].items():
        try:
            scheme, dtype, shape = spec["scheme"], spec["dtype"], spec["shape"]
        except (KeyError, TypeError):
            raise ArtifactError(f"artifact manifest entry for {name!r} is malformed; "
                                "the blob is corrupt") from None
        state_dict[name] = dequantize_tensor(entries, name, scheme, dtype_from_name(dtype), shape)
        used.update(container_keys(name, scheme))
    extra = sorted(set(entries) - used)
    if extra:
        raise ArtifactError(f"artifact has entries not in its manifest ({extra[:5]}); "
                            "the blob is corrupt or from an incompatible writer")
    return state_dict, doc


def decode_artifact(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Compressed blob -> (state_dict, header). `header["meta"]` is the recipe/model identity."""
    return decode_container(decompress(blob))
