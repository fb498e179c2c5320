"""`pgolf bench RECIPE`: how fast the recipe trains and evaluates here, on synthetic data.

    pgolf bench tiny --steps 20                      # CPU, seconds
    pgolf bench sidecar48 --steps 20                 # one GPU: the 8-GPU step by gradient accumulation
    pgolf bench sidecar48 --steps 0 --set eval.stride=64 --set eval.seq_len=2048   # the eval pass only

It writes challenge-format shards of random tokens of the recipe's vocabulary (a BOS every ~1,000
tokens) to a temporary folder (or `--data-dir`), builds the recipe's Trainer on them exactly as
`pgolf run` does (same fast paths, same gradient accumulation), runs `--warmup` untimed-apart
steps and `--steps` timed ones, then one sliding-window eval pass (`eval.seq_len`, `eval.stride`)
over synthetic validation tokens, and prints `key=value` lines:

- step_ms_median / min / max: each timed step alone, after the warm-up; on CUDA timed with CUDA
  events around each step (the device's time), on the CPU with the wall clock.
- compile_warmup_s, first_step_s: the warm-up steps' wall time, synchronised (with torch.compile
  on, the compilation happens there), kept apart from the step figures.
- tokens_counted: the tokens the loader actually served during the timed steps (x.numel() of
  every micro-batch); tests hold it to steps x tokens_per_step. tokens_per_s = tokens_per_step /
  median step time.
- flops_per_token: torch.utils.flop_counter's count of one training sequence's forward+backward
  (logits and cross-entropy; a trunk's training-only auxiliary terms are left out), the model built
  on the meta device and attention run through the math kernel: every matmul-like op (each linear,
  convolution and the output head: 6 FLOPs per weight per token) plus the attention score and value
  products at the full T x T (12 L T d per token; the causal half is not subtracted, the PaLM
  convention). For the baseline trunk that is exactly 6 N_matmul + 12 L T d.
- mfu = flops_per_token x tokens_per_s / peak_flops. peak_flops comes from a small table of
  datasheet dense peaks by CUDA device name and precision (bf16 with autocast, else TF32/FP32);
  on the CPU it is measured here (the best of a few 1024^3 matmuls in the training dtype, this
  process's threads), and `peak_flops_source` says which. An unknown GPU prints mfu=n/a.
- peak_mem_bytes: torch.cuda.max_memory_allocated over the timed steps on CUDA; on the CPU the
  growth of the process's peak resident set (VmHWM, reset before the steps where Linux allows,
  else the process's lifetime peak), as `peak_mem_kind` says.
- eval_tokens_per_s: scored tokens / wall time of the eval pass (synchronised), compile excluded
  (the eval model is not compiled).
"""

from __future__ import annotations

import contextlib
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.config import Recipe
from pipeline.data.shards import list_shards, shard_name, write_shard
from pipeline.distributed import DistInfo
from pipeline.errors import UserError

BOS_ID = 1  # the challenge tokenizers' BOS
DOC_TOKENS = 1000  # mean synthetic document length

# Dense (no sparsity) peak FLOP/s by device-name pattern and precision, from NVIDIA's datasheets
# (H100 SXM/H200: BF16 989.4 T, TF32 494.7 T, FP32 66.9 T; H100 PCIe: 756 / 378 / 51.2 T;
# A100: 312 / 156 / 19.5 T). First match wins: the PCIe pattern precedes the generic H100.
PEAK_FLOPS = (
    (r"H100.*PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"H100|H200|GH200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def write_synthetic_shards(out_dir: Path, vocab_size: int, train_tokens: int, val_tokens: int,
                           seed: int = 0, prefix: str = "fineweb", train_shards: int = 4) -> Path:
    """Challenge-format train and val shards of uniform random tokens in [0, vocab_size) with a
    BOS at the start of every synthetic document (lengths ~ 1 + Poisson(DOC_TOKENS))."""
    if vocab_size <= BOS_ID + 1:
        raise UserError(f"model.vocab_size {vocab_size} is too small for synthetic data (BOS is id {BOS_ID})")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def stream(n: int) -> np.ndarray:
        toks = rng.integers(BOS_ID + 1, vocab_size, n, dtype=np.int64)
        starts = np.cumsum(1 + rng.poisson(DOC_TOKENS, n // DOC_TOKENS + 2))
        toks[0] = BOS_ID
        toks[starts[starts < n]] = BOS_ID
        return toks

    per_shard = -(-train_tokens // train_shards)
    for i in range(train_shards):
        write_shard(out_dir / shard_name(prefix, "train", i), stream(per_shard))
    write_shard(out_dir / shard_name(prefix, "val", 0), stream(val_tokens))
    return out_dir


def count_flops_per_token(recipe: Recipe) -> float:
    """FLOPs of one training sequence's forward+backward per token (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model

    with torch.device("meta"):
        model = build_model(recipe.model)
    T = recipe.train.seq_len
    ids = torch.zeros(1, T, dtype=torch.long, device="meta")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        # forward (the trunk contract: logits [B, T, V]) and cross-entropy: training-only auxiliary
        # terms are left out, and some read values back to the host, which a meta tensor cannot do
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids.reshape(-1)).backward()
    return counter.get_total_flops() / T


def peak_for_name(name: str, precision: str) -> Optional[float]:
    """The datasheet dense peak of a CUDA device named `name` in `precision`, or None if unknown."""
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks[precision]
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where it comes from) for `precision` in bf16 / tf32 / fp32."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_for_name(name, precision)
        return peak, f"{'datasheet' if peak else 'unknown'}:{name.replace(' ', '_')}:{precision}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best, f"measured_matmul_1024:{precision}:threads={torch.get_num_threads()}"


class _PeakMemory:
    """CUDA: max_memory_allocated. CPU: growth of VmHWM after a reset (Linux), else ru_maxrss."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.kind, self.base = "cpu_rss_peak_growth", 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")
        except OSError:
            self.kind = "cpu_process_max_rss"

    @staticmethod
    def _status(key: str) -> int:
        m = re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_rss_peak_growth":
            return self._status("VmHWM") - self.base
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Marks a folder of synthetic shards as bench's own: it may rewrite it, and never another folder.
BENCH_MARKER = ".pgolf_bench"


def _claim_data_dir(data_dir: Path) -> None:
    """Make `data_dir` bench's own folder: new or empty, or written by an earlier bench (whose shards
    are removed, so no leftover shard joins this run). Raises UserError for any other folder: bench
    never writes over data it did not make (a real dataset passed here by mistake stays intact)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / BENCH_MARKER).exists():
        for old in data_dir.glob("fineweb_*.bin"):
            old.unlink()
    elif any(data_dir.iterdir()):
        raise UserError(f"--data-dir {data_dir} is not empty and was not made by pgolf bench, which writes "
                        f"synthetic shards there; give a new or empty folder (your data is left as it is).")
    (data_dir / BENCH_MARKER).write_text("synthetic shards written by pgolf bench\n")


def bench(recipe: Recipe, dist_info: DistInfo, steps: int, warmup: int, eval_tokens: Optional[int] = None,
          data_dir: Optional[Path] = None, echo: Callable[[str], None] = print) -> dict:
    """Run the benchmark and echo its key=value lines; returns them as a dict. `eval_tokens`: synthetic
    validation tokens (None: 64 x eval.seq_len; at least eval.seq_len). Raises UserError for settings
    it cannot run, before any step."""
    from eval.byte_tables import ByteTables
    from eval.scorer import evaluate
    from pipeline.stages.train import Trainer

    if dist_info.world_size != 1:
        raise UserError("pgolf bench runs one process (it follows the multi-GPU step by gradient accumulation, "
                        "train.reference_world_size); start it without torchrun.")
    if steps < 0 or warmup < 0:
        raise UserError(f"--steps and --warmup must be >= 0, got {steps} and {warmup}")
    device, t, e = dist_info.device, recipe.train, recipe.eval
    out: dict = {}

    def put(**kv) -> None:
        out.update(kv)
        echo(" ".join(f"{k}={v}" for k, v in kv.items()))

    eval_tokens = 64 * e.seq_len if eval_tokens is None else eval_tokens
    if eval_tokens < e.seq_len:
        raise UserError(f"--eval-tokens {eval_tokens} is fewer than one eval window (eval.seq_len={e.seq_len}); "
                        f"give at least {e.seq_len}, or leave it out for {64 * e.seq_len}.")
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgolf_bench_")))
        else:
            _claim_data_dir(Path(data_dir))
        train_tokens = max(2 * t.batch_tokens, 8 * (t.seq_len + 2))
        write_synthetic_shards(data_dir, recipe.model.vocab_size, train_tokens, eval_tokens + 1, seed=recipe.seed)
        trainer = Trainer(recipe, list_shards(data_dir, "train"), None, dist_info, log=lambda s: None)
        stack.callback(lambda: trainer.loader.close() if hasattr(trainer.loader, "close") else None)
        put(recipe=recipe.name, device=device, torch=torch.__version__, world_size=1, accum=trainer.accum,
            passes_per_step=trainer.passes_per_step, threads=torch.get_num_threads())
        put(**dict(kv.split("=", 1) for kv in trainer.fast.describe().split()))
        put(params=trainer.model.num_params(), tokens_per_step=t.batch_tokens, seq_len=t.seq_len)

        served = [0]
        real_next = trainer.loader.next_batch

        def counting_next_batch():
            x, y = real_next()
            served[0] += x.numel()
            return x, y

        trainer.loader.next_batch = counting_next_batch

        def one_step() -> torch.Tensor:
            loss_sum, _ = trainer.step_on_device()
            trainer.step += 1
            return loss_sum

        warm_times = []
        for _ in range(warmup):
            _sync(device)
            t0 = time.perf_counter()
            one_step()
            _sync(device)
            warm_times.append(time.perf_counter() - t0)
        put(warmup_steps=warmup, compile_warmup_s=f"{sum(warm_times):.3f}",
            first_step_s=f"{warm_times[0]:.3f}" if warm_times else "n/a")

        served[0] = 0
        mem = _PeakMemory(device)
        times, losses = [], []
        if steps:
            if device.type == "cuda":
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(steps)]
                _sync(device)
                for start, end in events:
                    start.record()
                    losses.append(one_step())
                    end.record()
                _sync(device)
                times = [start.elapsed_time(end) / 1000 for start, end in events]
            else:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    losses.append(one_step())
                    times.append(time.perf_counter() - t0)
        peak = mem.read()
        put(steps=steps, tokens_counted=served[0])
        if steps:
            med = statistics.median(times)
            last_loss = float(losses[-1]) / trainer.passes_per_step
            if not np.isfinite(last_loss):
                raise UserError(f"the benchmark's training loss became {last_loss}; the recipe diverges here")
            put(step_ms_median=f"{med * 1000:.2f}", step_ms_min=f"{min(times) * 1000:.2f}",
                step_ms_max=f"{max(times) * 1000:.2f}", tokens_per_s=f"{t.batch_tokens / med:.0f}",
                loss_last=f"{last_loss:.4f}")
            fpt = count_flops_per_token(recipe)
            precision = ("bf16" if trainer.fast.autocast is not None else
                         "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32")
            peak_fl, source = peak_flops(device, precision)
            achieved = fpt * t.batch_tokens / med
            put(flops_per_token=f"{fpt:.0f}", achieved_flops=f"{achieved:.4g}",
                peak_flops=f"{peak_fl:.4g}" if peak_fl else "n/a", peak_flops_source=source,
                mfu=f"{achieved / peak_fl:.4f}" if peak_fl else "n/a")
        put(peak_mem_bytes=peak, peak_mem_kind=mem.kind)

        # ---- the eval pass: sliding windows over synthetic validation tokens (1 byte per token)
        from pipeline.data.shards import load_shard

        val = np.asarray(load_shard(list_shards(data_dir, "val")[0]), dtype=np.int64)
        pieces = [None if i == BOS_ID else b"x" for i in range(recipe.model.vocab_size)]
        tables = ByteTables.from_token_bytes(pieces, recipe.model.vocab_size)
        model = trainer.ema_model() if trainer.ema is not None else trainer.model
        _sync(device)
        t0 = time.perf_counter()
        res = evaluate(model, val, tables, e, device)
        _sync(device)
        seconds = time.perf_counter() - t0
        put(eval_mode=e.mode, eval_seq_len=e.seq_len, eval_stride=e.stride, eval_batch_seqs=e.batch_seqs,
            eval_tokens=res.token_count, eval_s=f"{seconds:.3f}", eval_tokens_per_s=f"{res.token_count / seconds:.0f}")
    return out
