"""Full-Hessian GPTQ quantization schemes `gptq5`, `gptq6`, `gptq7`, `gptq8` (pg_mechanics.md §4.1.4).

    quant:
      rules:
        - {scheme: gptq6, pattern: '\\.mlp\\.', clip_sigmas: 11.5}     # the 1.0611 record's MLP
        - {scheme: gptq7, roles: [embedding], clip_sigmas: 14.0}       # its int7 tied embedding

What it does. GPTQ rounds a linear layer's weight W [rows, cols] one input column at a time and
pushes each column's rounding error onto the columns not yet rounded, weighted by how the layer's
inputs co-vary, so the layer's *output* error on real inputs is what gets minimised rather than
the weight error (Frantar et al. 2022, arXiv 2210.17323; the records' `gptq_quantize_weight`,
origin PR #535/#634, merged in PR #1019, SD-clip scales from PR #1394). How, per tensor:

1. the calibrate hook (`collect_hessians`) runs the trained model on `quant.calibration_batches`
   training micro-batches inside the training budget (pipeline.export.calibration) and, for
   every 2-D parameter used as a linear map (`F.linear(x, W)`, `x @ W.t()`: nn.Linear layers and
   the tied embedding's logits alike), sums H = X^T X over the inputs X, averaged per token and
   all-reduced across processes;
2. dead inputs (H_jj = 0) get H_jj = 1 and a zero column; damping H += 0.01 * mean(diag H) * I;
3. act-order: columns in descending order of diag(H);
4. U = the upper Cholesky factor of H^-1;
5. per-row scales are fixed first, from the row (SD-clip `clip_sigmas` * std, a `clip_percentile`,
   or the row max; fp16, as codec.row_clip / scales_from_clip), then columns are rounded in
   blocks of 128: q_j = clamp(round(w_j / s), -qmax, qmax), err_j = (w_j - q_j s) / U_jj,
   w_k -= err_j U_jk for the later columns of the block, and after the block the accumulated
   errors update every later column at once (Err @ U[block, rest]);
6. the permutation is undone.

Codes are the symmetric clip_range = 2**(bits-1) - 1 of every record since 03-22 ([-31, 31] for
gptq6). The container layout is exactly the per-row integer one (`<name>.q` int8 codes,
`<name>.scale` fp16 per row; one fp32 scalar for 1-D and 0-D tensors), decoded by the same
codec.int_decode: GPTQ only chooses different codes. A tensor the hook saw no linear use of has
no Hessian, and encoding it is an error naming the tensor (quantize it with a plain int scheme).

Runtime module: the generated script carries it only when a recipe's rules name a gptq scheme.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.export import codec

BLOCK = 128  # columns rounded before the accumulated error is pushed to the rest (the records' block_size)
DAMP = 0.01  # damping as a fraction of mean(diag H) (the records' 0.01)


class GPTQError(codec._ErrorBase):
    """GPTQ cannot quantize a tensor: no Hessian for it, or a Hessian it cannot factor."""


# ------------------------------------------------------------------------------ Hessians


class _LinearInputs(TorchFunctionMode):
    """Adds X^T X of the input of every linear use of a watched 2-D parameter: F.linear(x, W) (what
    nn.Linear calls) and x @ W.t() (a tied head). Parameters are recognised by storage, shape and
    strides, so W.to(same dtype) and W.t() views are seen; a copy (another dtype) is not."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.direct, self.transposed = {}, {}
        for name, p in params.items():
            self.direct[(p.data_ptr(), tuple(p.shape), p.stride())] = name
            self.transposed[(p.data_ptr(), tuple(p.shape[::-1]), p.stride()[::-1])] = name
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._last = (None, None)  # (input, its X^T X): q, k and v read the same input

    def _add(self, name: str, x: torch.Tensor) -> None:
        if x is not self._last[0]:  # the same tensor object (held here, so never a reused address)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            self._last = (x, (x2.t() @ x2, x2.shape[0]))
        xtx, n = self._last[1]
        h = self.hessians.get(name)
        if h is None:
            h = self.hessians[name] = torch.zeros_like(xtx)
            self.tokens[name] = 0
        h.add_(xtx)
        self.tokens[name] += n

    @staticmethod
    def _key(t) -> tuple | None:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            return None
        return t.data_ptr(), tuple(t.shape), t.stride()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.direct.get(self._key(weight))
            if name is not None:
                self._add(name, args[0])
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            name = self.transposed.get(self._key(args[1]))
            if name is not None:
                self._add(name, args[0])
        return out


def collect_hessians(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """The calibrate hook: {parameter name: H = mean over tokens of x x^T} for every 2-D parameter
    the model uses as a linear map, from every batch of `batches` (all of them are consumed)."""
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    watch = _LinearInputs(params)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), watch:
            for x, _y in batches:
                model(x)
    finally:
        model.train(was_training)
        watch._last = (None, None)
    names = sorted(watch.hessians)
    tokens = {n: float(watch.tokens[n]) for n in names}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every process saw its own batches: sum their statistics (same names on every rank: same model)
        for n in names:
            dist.all_reduce(watch.hessians[n])
        counts = torch.tensor([tokens[n] for n in names], dtype=torch.float64,
                              device=next(iter(watch.hessians.values())).device if names else "cpu")
        if names:
            dist.all_reduce(counts)
        tokens = dict(zip(names, counts.tolist()))
    return {n: watch.hessians[n] / max(tokens[n], 1.0) for n in names}


def identity_hessian(shape) -> torch.Tensor:
    """The stand-in Hessian (uncorrelated unit inputs): GPTQ then rounds like round-to-nearest."""
    shape = tuple(int(d) for d in shape)
    cols = 1
    for d in (shape[1:] if len(shape) >= 2 else shape):
        cols *= d
    return torch.eye(cols)


# ------------------------------------------------------------------------------ the algorithm


def gptq_codes(w2: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmax: int, name: str = "tensor",
               block: int = BLOCK, damp: float = DAMP) -> torch.Tensor:
    """int8 codes of `w2` [rows, cols] (float32) for per-row scales `scale` [rows] (float32, the
    stored values), minimising the output error under input second moments `hessian` [cols, cols]."""
    rows, cols = w2.shape
    if tuple(hessian.shape) != (cols, cols):
        raise GPTQError(f"tensor {name!r}: its Hessian is {list(hessian.shape)}, GPTQ needs [{cols}, {cols}] "
                        "(the input width of the layer); the calibration does not belong to this model")
    H = hessian.detach().to(torch.float64).clone()
    W = w2.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    s = scale.float().reshape(rows)
    if not bool(torch.count_nonzero(H - torch.diag(torch.diagonal(H)))):
        # Uncorrelated inputs (the size predictor's identity stand-in): U is diagonal, no error reaches
        # another column and the loop below rounds to nearest; the same codes, without its cols steps.
        Q = torch.round(W / s.unsqueeze(1)).clamp_(-qmax, qmax).to(torch.int8)
        return Q[:, torch.argsort(perm)].contiguous()
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise GPTQError(f"tensor {name!r}: its damped Hessian is not positive definite ({e}); the calibration "
                        "is corrupt (NaN/inf activations?) — retrain, or quantize it with a plain int scheme") from None
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Wb, Ub = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            q = torch.round(Wb[:, j] / s).clamp_(-qmax, qmax)
            Q[:, i1 + j] = q.to(torch.int8)
            e = (Wb[:, j] - q * s) / Ub[j, j]
            err[:, j] = e
            Wb[:, j:] -= e.unsqueeze(1) * Ub[j, j:].unsqueeze(0)
        if i2 < cols:
            W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].contiguous()


def _gptq_scheme(bits: int) -> codec.Scheme:
    scheme_name, qmax = f"gptq{bits}", 2 ** (bits - 1) - 1

    def encode(t, *, name, clip_percentile=None, scale_floor=None, calibration=None, clip_sigmas=None):
        if calibration is None:
            raise GPTQError(f"tensor {name!r}: {scheme_name} needs the Hessian of its inputs, and the calibration "
                            "saw no linear use of it (F.linear(x, W) or x @ W.t()); quantize it with a plain int "
                            "scheme (e.g. int6 or int8) by a rule before the gptq one")
        w = t.detach().float()
        per_row = w.ndim >= 2
        w2 = w.reshape(w.shape[0], -1) if per_row else w.reshape(1, -1)
        clip = codec.row_clip(w2, clip_percentile, clip_sigmas)
        scale = codec.scales_from_clip(clip, qmax, per_row, scale_floor, scheme_name, name)
        q = gptq_codes(w2, calibration, scale.float().reshape(-1), qmax, name)
        return {name + ".q": q.reshape(t.shape), name + ".scale": scale if per_row else scale.reshape(())}

    return codec.Scheme(scheme_name, encode, codec.int_decode, codec.int_layout, int_range=(-qmax, qmax),
                        takes_clip=True, calibrate=collect_hessians, stand_in=identity_hessian)


for _bits in (5, 6, 7, 8):
    codec.register_scheme(_gptq_scheme(_bits))
