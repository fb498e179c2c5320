"""Activation peaks by tracing: one forward + backward pass of a model run under PyTorch's
FakeTensorMode (shapes and dtypes only, nothing allocated), with a dispatch mode below autograd
(`LiveBytes`) that adds the bytes of every storage the pass allocates and subtracts them when the
storage is freed: a simulated allocator whose high-water mark is the pass's peak. pipeline.preflight
uses it for the activations term of its memory estimate; on real tensors the same counter gives the
same peak to the byte (tests/test_preflight.py).

    peak = activation_peak(meta_model, seqs=48, seq_len=2048, device_type="cuda")   # bytes

CUDA runs bf16 autocast, which this CPU-only trace imitates with CPU autocast plus CUDA's float32 op
list (`CudaFp32Policy`). Traced peaks are kept on disk under pgolf's cache, keyed on the model
config, the shape, the device type, torch's version and the code of pipeline/model and this module.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every storage an operator returns, subtracts them when the storage is
    freed, and keeps the high-water mark. It sits below autograd, so it sees the backward's
    operators too. An output that shares an input's storage (a view such as a weight's
    transpose, an in-place update such as gradient accumulation) allocates nothing."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key not in self._refs and key not in inputs:
                    n = st.nbytes()
                    self.live += n
                    self._refs[key] = weakref.ref(st, lambda _r, key=key, n=n: self._freed(key, n))
        self.peak = max(self.peak, self.live)
        return out


# CUDA autocast runs these in float32 (PyTorch's "CUDA Ops that can autocast to float32",
# torch.amp docs, and AT_FORALL_FP32 in aten/src/ATen/autocast_mode.cpp, which adds rms_norm);
# CPU autocast leaves most of them in bf16. Emulating CUDA on a CPU-only machine therefore runs
# CPU autocast (the same bf16 matmul/linear/conv/SDPA list, and its weight-cast cache) with
# these functions' floating inputs cast to float32 first, as CUDA's autocast would.
_CUDA_FP32_FUNCS = frozenset({
    "pow", "__pow__", "__rpow__", "square", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "layer_norm", "group_norm",
    "rms_norm", "norm", "normalize", "softmax", "log_softmax", "softmin", "cross_entropy", "nll_loss",
    "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy_with_logits", "cumsum",
    "cumprod", "prod", "sum", "dist", "cdist", "pdist", "cosine_similarity", "logsumexp", "renorm",
})


class CudaFp32Policy(TorchFunctionMode):
    """Under CPU autocast, run `_CUDA_FP32_FUNCS` on float32 inputs, as CUDA autocast does. It
    acts above autograd, so the casts are recorded (and their saved copies counted)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _CUDA_FP32_FUNCS and torch.is_autocast_enabled("cpu"):
            def up(a):
                return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def activation_peak(meta_model: torch.nn.Module, seqs: int, seq_len: int, device_type: str,
                     model_cfg: Optional[dict] = None, step: int = 0) -> int:
    """Peak bytes one forward + backward pass of `seqs` sequences allocates (see the docstring).

    Tracing a full-size model costs seconds (one fake dispatch per op), so with `model_cfg` the
    result is remembered on disk under pgolf's cache, keyed by everything it depends on: the
    model config, the pass shape, the device type, torch's version and the model code."""
    key = None
    if model_cfg is not None:
        key = _trace_key(model_cfg, seqs, seq_len, device_type, step)
        hit = _TRACE_CACHE.get(key)
        if hit is not None:
            return hit
    peak = _trace_activation_peak(meta_model, seqs, seq_len, device_type, step)
    if key is not None:
        _TRACE_CACHE.put(key, peak)
    return peak


def _trace_key(model_cfg: dict, seqs: int, seq_len: int, device_type: str, step: int = 0) -> str:
    import hashlib
    import json

    code = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "model").rglob("*.py")) + [Path(__file__)]:
        code.update(path.read_bytes())
    doc = {"model": model_cfg, "seqs": seqs, "seq_len": seq_len, "device": device_type, "step": step,
           "torch": torch.__version__, "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class _TraceCache:
    """Traced activation peaks on disk ({key: bytes} in one JSON file); a damaged or read-only
    cache only costs tracing again."""

    def _path(self) -> Path:
        from pipeline.provenance import cache_root

        return cache_root() / "activation_peaks.json"

    def _load(self) -> dict:
        import json

        try:
            data = json.loads(self._path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Optional[int]:
        value = self._load().get(key)
        return int(value) if isinstance(value, int) else None

    def put(self, key: str, value: int) -> None:
        from pipeline.fileio import write_json_atomic

        data = self._load()
        data[key] = int(value)
        try:
            self._path().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._path(), data)
        except OSError:
            pass


_TRACE_CACHE = _TraceCache()


def _trace_activation_peak(meta_model: torch.nn.Module, seqs: int, seq_len: int, device_type: str,
                           step: int = 0) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # The shape environment lets a value read back to the host (the depth-recurrent trunk's
    # diagnostics call .tolist()) become a symbol instead of an error; shapes stay concrete.
    fake = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with fake:
        # The meta model's storage becomes fake CPU storage: shapes and dtypes, still no memory.
        model = meta_model.to_empty(device="cpu")
        for p in model.parameters():
            if p.requires_grad:
                # Gradients are a term of their own: they exist from a step's first backward
                # on, and every later pass of the step adds into them, which is what is traced
                # (a step of one pass allocates them during its backward instead: the estimate
                # is then high by at most the gradients' size).
                p.grad = torch.zeros_like(p)
        ids = torch.zeros(seqs, seq_len, dtype=torch.long)
        targets = torch.zeros(seqs, seq_len, dtype=torch.long)
        tracker = LiveBytes()
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=device_type == "cuda"), \
                    (CudaFp32Policy() if device_type == "cuda" else contextlib.nullcontext()):
                loss = model.training_loss(ids, targets, step)[0]
            loss.backward()
    return tracker.peak

