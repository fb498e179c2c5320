"""LQER: low-rank repair of the quantization error of the worst tensors (pg_mechanics.md §4.1.6).

    quant:
      lqer: {rank: 4, top_k: 3}        # the 1.0611 record's LQER_RANK=4, LQER_TOP_K=3, asymmetric

What it does (origin PR #1797, used by the 1.0611 record, `gptq_mixed_quantize` there). After every
tensor is quantized, each integer-coded tensor of two or more dims has an error E = W - W_hat (W_hat
what its codes decode to); the `top_k` tensors with the largest ||E||_F get a rank-r correction,
r = min(rank, rows, cols):

    E ~ U_r S_r V_r^T (SVD),  A = U_r S_r [rows, r],  B = V_r^T [r, cols]
    A: int2 codes in [-2, 1], one fp16 scale max|A| / 1.5 for the matrix
    B: int4 codes in [-8, 7], one fp16 scale max|group| / 7.5 per 64 consecutive elements of B
       flattened (the last group may be shorter)

and the reader adds (qA sA)(qB sB) to the decoded weight. That is the record's asymmetric packing
(LQER_ASYM_ENABLED=1, group 64); its symmetric per-row int4 fallback for a B whose size is not a
multiple of 64 is replaced here by the shorter last group. Scales are floored at fp16's smallest
normal so an all-zero error stays zero.

Container: a repaired tensor's scheme becomes "<base>+lqer<rank>" (e.g. "gptq6+lqer4"), whose
entries are the base scheme's plus
    <name>.lqA   int8 [rows, r]    <name>.lqAs  fp16 []
    <name>.lqB   int8 [r, cols]    <name>.lqBs  fp16 [ceil(r * cols / 64)]
(N-D tensors are viewed as [shape[0], -1], 1-D and 0-D ones as one row, like the integer codes;
only tensors of two or more dims are ever chosen.) These names are resolved by
`_resolve`, registered with codec.RESOLVERS, so a reader builds the scheme from its name alone.

Runtime module: the generated script carries it only when the recipe sets `quant.lqer`.
"""

from __future__ import annotations

import math
import re

import torch

from pipeline.export import codec

GROUP = 64  # elements of flattened B per scale (LQER_ASYM_GROUP)
_DERIVED = re.compile(r"(?P<base>.+)\+lqer(?P<rank>[1-9][0-9]*)")


def derived_name(base: str, rank: int) -> str:
    return f"{base}+lqer{int(rank)}"


def _rows_cols(shape) -> tuple[int, int]:
    """The [rows, cols] view of a tensor, as the per-row integer schemes take it (1-D, 0-D: one row)."""
    shape = [int(d) for d in shape]
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


def effective_rank(shape, rank: int) -> int:
    rows, cols = _rows_cols(shape)
    return min(int(rank), rows, cols)


def _scale(amax: torch.Tensor, levels: float) -> torch.Tensor:
    return (amax / levels).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)


def factor_entries(name: str, err2: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    """The four LQER entries of tensor `name` for its error `err2` [rows, cols] at rank r."""
    rows, cols = err2.shape
    if r == 0:  # an empty tensor: nothing to repair
        A, B = err2.new_zeros(rows, 0), err2.new_zeros(0, cols)
    else:
        U, S, Vh = torch.linalg.svd(err2.detach().double(), full_matrices=False)
        A, B = (U[:, :r] * S[:r]).float(), Vh[:r].float()
    sA = _scale(A.abs().amax() if A.numel() else A.new_zeros(()), 1.5)
    qA = torch.round(A / sA.float()).clamp_(-2, 1).to(torch.int8)
    flat = B.reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % GROUP)]).reshape(-1, GROUP)
    sB = _scale(padded.abs().amax(dim=1) if padded.numel() else padded.new_zeros(0), 7.5)
    qB = torch.round(padded / sB.float().unsqueeze(1)).clamp_(-8, 7).reshape(-1)[:flat.numel()]
    return {name + ".lqA": qA.contiguous(), name + ".lqAs": sA.reshape(()).contiguous(),
            name + ".lqB": qB.to(torch.int8).reshape(B.shape).contiguous(), name + ".lqBs": sB.contiguous()}


def correction(entries: dict, name: str) -> torch.Tensor:
    """(qA sA)(qB sB): the low-rank term the reader adds, [rows, cols] float32."""
    qA, sA, qB, sB = (entries[name + k] for k in (".lqA", ".lqAs", ".lqB", ".lqBs"))
    flat = qB.float().reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % GROUP)]).reshape(-1, GROUP)
    B = (padded * sB.float().unsqueeze(1)).reshape(-1)[:flat.numel()].reshape(qB.shape)
    return (qA.float() * sA.float()) @ B


def _lqer_layout(name, shape, r) -> list[codec.Entry]:
    rows, cols = _rows_cols(shape)
    return [codec.Entry(name + ".lqA", torch.int8, [rows, r], "lqer"),
            codec.Entry(name + ".lqAs", torch.float16, [], "lqer_scale"),
            codec.Entry(name + ".lqB", torch.int8, [r, cols], "lqer"),
            codec.Entry(name + ".lqBs", torch.float16, [-(-r * cols // GROUP)], "lqer_scale")]


def derived_scheme(base_name: str, rank: int) -> codec.Scheme:
    """Scheme "<base>+lqer<rank>": the base scheme's entries plus the LQER factors of its error."""
    base = codec.get_scheme(base_name)
    if base is None or base.int_range is None:
        raise ValueError(f"LQER repairs integer-coded tensors; {base_name!r} is not an integer scheme")

    def decode_base(entries, name, shape) -> torch.Tensor:
        return base.decode(entries, name, torch.float32, list(shape)).reshape(_rows_cols(shape))

    def encode(t, *, name, calibration=None, **options):
        entries = base.encode(t, name=name, calibration=calibration, **options)
        err = t.detach().float().reshape(_rows_cols(t.shape)) - decode_base(entries, name, t.shape)
        entries.update(factor_entries(name, err, effective_rank(t.shape, rank)))
        return entries

    def decode(entries, name, dtype, shape):
        w = decode_base(entries, name, shape) + correction(entries, name)
        return w.reshape(shape).to(dtype)

    def layout(name, shape, dtype):
        return base.layout(name, shape, dtype) + _lqer_layout(name, shape, effective_rank(shape, rank))

    return codec.Scheme(derived_name(base_name, rank), encode, decode, layout, int_range=base.int_range,
                        takes_clip=base.takes_clip, selectable=False, stand_in=base.stand_in)


def _resolve(name: str):
    m = _DERIVED.fullmatch(name)
    if m is None:
        return None
    base = codec.get_scheme(m["base"])
    if base is None or base.int_range is None:
        return None
    return derived_scheme(m["base"], int(m["rank"]))


codec.RESOLVERS.append(_resolve)


def candidates(manifest: dict) -> list[str]:
    """Tensors LQER may repair: integer-coded, two or more dims, not empty, not repaired already."""
    out = []
    for name, m in manifest.items():
        spec = codec.get_scheme(m["scheme"])
        shape = m["shape"]
        if spec is None or spec.int_range is None or len(shape) < 2 or _DERIVED.fullmatch(m["scheme"]):
            continue
        if min(_rows_cols(shape)) > 0:
            out.append(name)
    return out


def apply_lqer(qmodel, state_dict, rank: int, top_k: int) -> list[tuple[str, float]]:
    """Repair the `top_k` candidates of `qmodel` (a plan.QuantizedModel, changed in place) with the
    largest ||W - W_hat||_F; returns [(name, error norm before)] of the repaired ones, worst first."""
    norms = []
    for name in candidates(qmodel.manifest):
        m = qmodel.manifest[name]
        entries = {k: qmodel.tensors[k] for k in qmodel.entries_of(name)}
        what = codec.get_scheme(m["scheme"]).decode(entries, name, torch.float32, m["shape"])
        w = state_dict[name].detach().cpu().float()
        norms.append((float((w - what).norm()), name))
    norms.sort(key=lambda e: (-e[0], e[1]))  # ties by name: the same choice every run
    chosen = norms[:top_k]
    rows_of = {e["name"]: e for e in qmodel.plan}
    for norm, name in chosen:
        m = qmodel.manifest[name]
        shape = m["shape"]
        entries = {k: qmodel.tensors[k] for k in qmodel.entries_of(name)}
        base = codec.get_scheme(m["scheme"])
        err = state_dict[name].detach().cpu().float().reshape(_rows_cols(shape)) \
            - base.decode(entries, name, torch.float32, shape).reshape(_rows_cols(shape))
        qmodel.tensors.update(factor_entries(name, err, effective_rank(shape, rank)))
        m["scheme"] = derived_name(m["scheme"], rank)
        codec.get_scheme(m["scheme"])  # registers the derived scheme the reader will look up
        if name in rows_of:
            rows_of[name]["lqer_rank"] = effective_rank(shape, rank)
    return chosen
