"""Preflight: predict one training process's peak memory and refuse, before any step, a run that
cannot fit.

    est = estimate_memory(recipe, world_size=1, device_type="cpu")   # MemoryEstimate, bytes per term
    avail = available_memory(torch.device("cpu"))                     # AvailableMemory(bytes, source)
    preflight(recipe, dist_info)    # -> MemoryEstimate; raises UserError if the run cannot fit

Without it a recipe sized for an 80 GB GPU, started on a laptop, grows until the kernel's
out-of-memory killer ends it without a word (sidecar48 on CPU: ~50 GiB of activations per pass).
The refusal names the README's CPU smoke command for the recipe and the largest
train.micro_batch_seqs that fits: the trainer then runs each micro-batch in passes of that many
sequences, on the same trajectory, and only the activations shrink.

What one process holds at its peak (`MemoryEstimate`, all in bytes):

- parameters: every parameter and buffer of the model built on the meta device (no memory is
  allocated, and every trunk and part is covered because it is the model's own constructor).
- gradients: one per trainable parameter, same dtype. They live across the micro-steps of an
  optimizer step (accumulation), so they are counted whole.
- optimizer_state: what `pipeline.optim` allocates at its first step: Muon one momentum buffer
  per 2-D block matrix *this rank owns* (matrix i belongs to rank i % world_size; the largest
  share over ranks is counted), Adam(W) exp_avg + exp_avg_sq + a 0-d step per other parameter;
  with grad_conditioning mode=hypergradient, the previous gradient of every tensor.
- ema: the fp32 shadow of the whole state_dict (`pipeline.stages.ema`).
- prime_snapshot: with train.prime_steps > 0, `Trainer.prime` deep-copies the model and the EMA
  (optimizer state is still empty then) and holds them during the priming steps.
- ddp_buckets: with world_size > 1, DistributedDataParallel's flat gradient buckets, one more
  copy of the gradients.
- loader: the batches the training loader holds (int64 x and y, the coprime loader's prefetch
  queue of uint16 windows per micro-step loader). Memory-mapped shards are page cache, which
  the kernel reclaims, so they are not counted.
- activations: the peak of one forward + backward pass over `micro_batch_seqs` sequences
  (the whole per-rank micro-batch when 0), measured by *running* that pass on fake tensors
  (below). It includes the tensors autograd saves, the transients at the peak (the logits and
  their softmax/cross-entropy buffers, B x T x V in fp32, sit there), the bf16 weight copies
  autocast makes, and each parameter's fresh gradient before it is added to `.grad`.
- optimizer_step: the transient of the update, after the activations are freed: Muon's flat
  update buffer (all matrices, in its Newton-Schulz dtype) plus one matrix's Newton-Schulz
  working set, and the foreach Adam's sqrt(v) copy (CPU; the fused CUDA kernel has none).

total = parameters + gradients + optimizer_state + ema + prime_snapshot + ddp_buckets + loader
        + max(activations, optimizer_step)

How activations are counted. Rather than a hand formula per part (which would drift the moment a
part changes, and would miss parts such as the sidecar, TrueEvolving or the depth-recurrent
trunk), the estimate runs `model.training_loss(x, y, step)` at the run's last step (a trunk that grows
during training, such as looped layers, is largest there) and `.backward()` for one pass under
PyTorch's FakeTensorMode, where every operator computes only shapes and dtypes, and a dispatch
mode below autograd adds up the bytes of every storage the pass allocates and subtracts them when
the storage is freed: a simulated allocator whose high-water mark is the pass's peak. It
allocates nothing and takes a few seconds for sidecar48; on real tensors the same counter gives
the same peak to the byte (tests/test_preflight.py, every recipe). CPU runs in fp32; CUDA runs
bf16 autocast, which this CPU-only trace imitates with CPU autocast plus CUDA's float32 op list
(pipeline.activation_trace).

What that count is, for the baseline block in fp32 (model_dim D, H heads, KV kv-heads of head_dim
hd, kv = KV*hd, MLP hidden h = mlp_mult*D), in floats per token per layer alive at the peak
(which is in the backward of the log-softmax, when every block's saved tensors still exist):
  3D       residual stream: the resid-mix sum, after attention, after the MLP
  2D       the normed inputs of attention and MLP (what their linears save)
  3D+2kv   outputs of c_q, c_k, c_v, attention proj, MLP proj
  2D+kv    q and k after RoPE, q after its gain
  D+H      the attention output and its log-sum-exp
  2h       the MLP hidden after relu and after the square
  2+H+KV   the rstd of the two block norms and the q/k head norms (+ RoPE's cos/sin tables)
= (11 + 2*mlp_mult) D + 3 kv + 2H + KV + 2; 16.5 D + 2H + KV + 2 with kv = D/2 and mlp_mult 2
(tests/test_preflight.py checks it). The logits add 4V fp32 per token at the peak (the tanh of
the softcap, the log-softmax, its gradient and the NLL gradient). sidecar48's parts (K/V shift,
k gain, local V mix, sidecar, bigram, smear) bring it to ~23 D per layer: 536 KiB per token on
CPU, which is why 48 x 2048 tokens per pass need ~50 GiB there.

Not modelled: torch.compile (on by default on CUDA; its fused graphs usually save less than eager
does, so the estimate is an upper bound there), the CUDA context and NCCL's buffers, which the
safety margin covers (`MARGIN`, `RESERVE_BYTES`).

Runtime-pure: imports the standard library and torch only (it may be bundled into a submission).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.activation_trace import activation_peak
from pipeline.config import Recipe, to_dict
from pipeline.errors import UserError

GIB = 2**30

# A run is refused when total * (1 + MARGIN) + RESERVE_BYTES exceeds the available memory.
# MARGIN: what the allocator holds beyond the live tensors the estimate counts (to the byte).
# On CPU glibc's malloc keeps freed chunks of 128 KiB-32 MiB in its heap: a step's measured peak
# RSS was 1.18-1.22x the estimate with 1-8 MiB tensors (tests/test_preflight.py; sidecar48 at full
# width, 2 x 2048 tokens per pass: 3120 MiB measured, 2559 MiB estimated) and 1.11x with 48 MiB
# tensors, which glibc mmaps and returns at once (so do a full-size run's). On CUDA the caching
# allocator rounds blocks up and keeps freed segments for reuse (fragmentation, typically 5-15%;
# not measured here, no GPU). RESERVE_BYTES: what no estimate sees: on CPU the kernel libraries
# paged in at first use and per-thread malloc arenas (~85 MiB measured); on CUDA cuBLAS
# workspaces and NCCL's communicator buffers (a few hundred MiB at 8 ranks).
MARGIN = {"cpu": 0.25, "cuda": 0.15}
RESERVE_BYTES = {"cpu": 256 * 2**20, "cuda": 768 * 2**20}

REPO_README = Path(__file__).resolve().parent.parent / "README.md"


# ------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class MicroBatchPlan:
    accum: int  # micro-steps per optimizer step (reference_world_size // world_size)
    local_seqs: int  # sequences each rank loads per micro-step
    chunk_seqs: int  # sequences per forward/backward pass (train.micro_batch_seqs, or local_seqs)

    @property
    def passes(self) -> int:
        return self.accum * (self.local_seqs // self.chunk_seqs)


def micro_batch_plan(recipe: Recipe, world_size: int) -> MicroBatchPlan:
    """The sizes `Trainer.__init__` computes, with the same errors for sizes that do not split."""
    t = recipe.train
    ref = t.reference_world_size
    if ref % world_size:
        raise UserError(f"train.reference_world_size ({ref}) must be a multiple of the world size "
                        f"({world_size}); run with a number of processes that divides it.")
    accum = ref // world_size
    micro_global = t.batch_tokens // accum
    if micro_global % (t.seq_len * world_size):
        raise UserError(f"train.batch_tokens ({t.batch_tokens}) must split into {accum} micro-steps x "
                        f"{world_size} ranks of whole train.seq_len ({t.seq_len}) sequences.")
    local_seqs = micro_global // world_size // t.seq_len
    mbs = t.micro_batch_seqs
    if mbs < 0 or (mbs and local_seqs % mbs):
        raise UserError(f"train.micro_batch_seqs ({mbs}) must be 0 (off) or divide the {local_seqs} sequences "
                        f"each rank runs per micro-step; one of {_divisors(local_seqs)}.")
    return MicroBatchPlan(accum, local_seqs, mbs or local_seqs)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one training process, by term (see the module docstring)."""

    device_type: str
    world_size: int
    accum: int
    local_seqs: int
    chunk_seqs: int
    seq_len: int
    parameters: int
    gradients: int
    optimizer_state: int
    ema: int
    prime_snapshot: int
    ddp_buckets: int
    loader: int
    activations: int
    optimizer_step: int

    TERMS = ("parameters", "gradients", "optimizer_state", "ema", "prime_snapshot", "ddp_buckets", "loader",
             "activations", "optimizer_step")

    @property
    def static(self) -> int:
        return (self.parameters + self.gradients + self.optimizer_state + self.ema + self.prime_snapshot
                + self.ddp_buckets + self.loader)

    @property
    def total(self) -> int:
        return self.static + max(self.activations, self.optimizer_step)

    @property
    def activation_bytes_per_token(self) -> float:
        return self.activations / (self.chunk_seqs * self.seq_len)

    def breakdown(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.TERMS}

    def describe(self) -> str:
        """One line: the terms and what the activations are for."""
        terms = ", ".join(f"{k} {size(v)}" for k, v in self.breakdown().items() if v)
        return (f"{size(self.total)} on {self.device_type} = {terms} (activations of one pass of "
                f"{self.chunk_seqs} x {self.seq_len} tokens; {self.accum} micro-step(s) x "
                f"{self.local_seqs // self.chunk_seqs} pass(es) per step, world size {self.world_size})")


def needed_bytes(est: MemoryEstimate) -> int:
    """What the available memory must hold for the run to be let through: the estimate plus margin."""
    return int(est.total * (1 + MARGIN[est.device_type])) + RESERVE_BYTES[est.device_type]


# ------------------------------------------------------------------------------- estimation


def estimate_memory(recipe: Recipe, world_size: int = 1, device_type: str = "cpu") -> MemoryEstimate:
    """Predicted peak memory of one process of a `world_size`-process run on `device_type`
    ("cpu" or "cuda"), with the recipe's train.micro_batch_seqs. Allocates no real tensors."""
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"memory estimate: device type {device_type!r} is not supported; use cpu or cuda.")
    plan = micro_batch_plan(recipe, world_size)
    t = recipe.train
    from pipeline.model import build_model
    from pipeline.optim.build import build_optimizers

    with torch.device("meta"):
        model = build_model(recipe.model)
    model.plan_training(t.max_steps)
    parameters = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(_nbytes(p) for p in trainable)

    # The optimizers themselves, built on the meta model, say which tensors Muon and Adam hold.
    optimizer_state, step_transient = _optimizer_bytes(
        build_optimizers(model, recipe.optim, rank=0, world_size=1), world_size, device_type)
    if recipe.optim.grad_conditioning.mode == "hypergradient":
        optimizer_state += gradients  # the previous raw gradient of every tensor
    ema = 0
    if recipe.ema.enabled:
        ema = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in model.state_dict().values())
    prime_snapshot = parameters + ema if t.prime_steps > 0 else 0
    ddp_buckets = gradients if world_size > 1 else 0
    loader = _loader_bytes(recipe, plan, device_type)
    # The last step's pass: a trunk that grows during training (looped layers) is largest there.
    activations = activation_peak(model, plan.chunk_seqs, t.seq_len, device_type, to_dict(recipe.model),
                                   step=t.max_steps - 1)
    return MemoryEstimate(device_type=device_type, world_size=world_size, accum=plan.accum,
                          local_seqs=plan.local_seqs, chunk_seqs=plan.chunk_seqs, seq_len=t.seq_len,
                          parameters=parameters, gradients=gradients, optimizer_state=optimizer_state, ema=ema,
                          prime_snapshot=prime_snapshot, ddp_buckets=ddp_buckets, loader=loader,
                          activations=activations, optimizer_step=step_transient)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _optimizer_bytes(optimizers, world_size: int, device_type: str) -> tuple[int, int]:
    """(persistent state, step transient) of the optimizers `pipeline.optim.build` makes."""
    from pipeline.optim.muon import Muon

    state, transient = 0, 0
    ns_bytes = 2 if device_type == "cuda" else 4  # Muon's Newton-Schulz dtype: bf16 on CUDA, fp32 on CPU
    for opt in optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        if isinstance(opt, Muon):
            # Matrix i is rank (i % world)'s: its momentum buffer exists only there. Count the
            # rank holding the most. (One param group per Muon here, as build_optimizers makes.)
            per_rank = [0] * world_size
            for i, p in enumerate(params):
                per_rank[i % world_size] += _nbytes(p)
            state += max(per_rank)
            # The step: one flat buffer of every matrix's update, plus the largest matrix's
            # working set: d = g + mu*b (fp32), X, X_next and the scaled update (m x n) and the
            # Gram matrices A, B (k x k, k = the smaller side), all in the Newton-Schulz dtype.
            flat = sum(p.numel() for p in params) * ns_bytes
            work = 0
            for p in params:
                m, n = p.shape[0], p.numel() // p.shape[0]
                work = max(work, m * n * 4 + (3 * m * n + 2 * min(m, n) ** 2) * ns_bytes)
            transient += flat + work
        else:
            # torch Adam/AdamW: exp_avg and exp_avg_sq like the parameter, and a 0-d fp32 step.
            state += sum(2 * _nbytes(p) + 4 for p in params)
            if device_type != "cuda":  # foreach Adam's sqrt(exp_avg_sq) list; the fused kernel has none
                transient += sum(_nbytes(p) for p in params)
    return state, transient


def _loader_bytes(recipe: Recipe, plan: MicroBatchPlan, device_type: str) -> int:
    tokens = plan.local_seqs * recipe.train.seq_len
    xy = 2 * 8 * tokens  # int64 inputs and targets of one micro-batch
    if recipe.train.loader != "coprime":
        return xy
    if device_type == "cuda":
        # Each micro-step loader stages its next batch on the device (pipeline.data.coprime_loader).
        return xy * (plan.accum + 1)
    # One loader per micro-step, each with a queue of uint16 windows and one being read.
    windows = plan.local_seqs * (recipe.train.seq_len + 1) * 2
    return xy + plan.accum * (recipe.train.coprime.queue_depth + 1) * windows


# ------------------------------------------------------------------------- available memory


@dataclass(frozen=True)
class AvailableMemory:
    bytes: Optional[int]  # None: this system does not say
    source: str  # where the number comes from, for the message


def available_memory(device: torch.device) -> AvailableMemory:
    """Memory one process of this run may still allocate on `device`.

    CUDA: the device's free memory (torch.cuda.mem_get_info) plus what this process's caching
    allocator holds unused. CPU: /proc/meminfo's MemAvailable, or the cgroup's limit minus its
    usage when that is lower (a container), shared among the processes torchrun starts on this
    host; where neither exists (macOS), the total physical memory, an upper bound."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return AvailableMemory(free + cached, f"free memory of {device} (torch.cuda.mem_get_info)")
    found = [m for m in (_meminfo_available(), _cgroup_available()) if m.bytes is not None]
    if not found:
        found = [_physical_memory()]
    best = min(found, key=lambda m: m.bytes if m.bytes is not None else math.inf)
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if best.bytes is not None and share > 1:
        return AvailableMemory(best.bytes // share, f"{best.source} / {share} processes on this host")
    return best


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _meminfo_available() -> AvailableMemory:
    text = _read("/proc/meminfo")
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text or "", re.MULTILINE)
    return AvailableMemory(int(m.group(1)) * 1024 if m else None, "MemAvailable in /proc/meminfo")


def _cgroup_available() -> AvailableMemory:
    """cgroup v2 (this process's own group, else the mount root), then cgroup v1. Usage counts
    page cache; its inactive file pages are reclaimable, so they are added back (as `docker
    stats` does)."""
    dirs = []
    own = re.search(r"^0::(/.*)$", _read("/proc/self/cgroup") or "", re.MULTILINE)
    if own:
        dirs.append("/sys/fs/cgroup" + own.group(1).rstrip("/"))
    dirs.append("/sys/fs/cgroup")
    for d in dirs:
        limit, usage = _read(f"{d}/memory.max"), _read(f"{d}/memory.current")
        if limit and usage and limit.strip() != "max":
            stat = re.search(r"^inactive_file (\d+)$", _read(f"{d}/memory.stat") or "", re.MULTILINE)
            used = int(usage) - (int(stat.group(1)) if stat else 0)
            return AvailableMemory(max(int(limit) - used, 0), f"cgroup limit {d}/memory.max minus its usage")
    v1 = "/sys/fs/cgroup/memory"
    limit, usage = _read(f"{v1}/memory.limit_in_bytes"), _read(f"{v1}/memory.usage_in_bytes")
    if limit and usage and int(limit) < 2**60:  # v1 writes a huge number for "no limit"
        stat = re.search(r"^total_inactive_file (\d+)$", _read(f"{v1}/memory.stat") or "", re.MULTILINE)
        used = int(usage) - (int(stat.group(1)) if stat else 0)
        return AvailableMemory(max(int(limit) - used, 0), f"cgroup v1 limit {v1}/memory.limit_in_bytes minus usage")
    return AvailableMemory(None, "no cgroup memory limit")


def _physical_memory() -> AvailableMemory:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return AvailableMemory(None, "unknown (no /proc/meminfo, no cgroup limit, no sysconf)")
    return AvailableMemory(total, "total physical memory (no MemAvailable on this system: an upper bound)")


# -------------------------------------------------------------------------------- preflight


def preflight(recipe: Recipe, dist_info, log: Callable[[str], None] = print,
              available: Optional[AvailableMemory] = None) -> MemoryEstimate:
    """Refuse, before any step, a run whose predicted peak does not fit this process's device.

    `dist_info`: the run's `pipeline.distributed.DistInfo` (its device and world size decide the
    estimate; call it after `distributed.init`, on every rank, before building the Trainer).
    Returns the estimate when it fits, after logging one line; when the system does not say how
    much memory is available it logs that it could not check and returns the estimate too.
    Otherwise raises UserError naming the predicted and available memory and the fixes: the
    README's CPU smoke command for the recipe, and the largest train.micro_batch_seqs that fits
    (same trajectory in smaller passes), if any does. With several processes every rank refuses
    if any one would not fit (one all-reduce), so none is left waiting in a collective."""
    device = torch.device(dist_info.device)
    est = estimate_memory(recipe, dist_info.world_size, device.type)
    avail = available if available is not None else available_memory(device)
    fits = _all_ranks_agree(avail.bytes is None or needed_bytes(est) <= avail.bytes, device)
    if fits and avail.bytes is None:
        log(f"preflight: predicted peak {size(est.total)} per process; available memory unknown "
            f"({avail.source}), not checked")
        return est
    if fits:
        log(f"preflight: predicted peak {size(est.total)} per process (needs {size(needed_bytes(est))} with "
            f"margin), {size(avail.bytes)} available on {device.type}")
        return est
    if avail.bytes is None or needed_bytes(est) <= avail.bytes:
        raise UserError(f"not enough memory to train {recipe.name} on another process of this run "
                        f"(this one predicts {size(est.total)} and has {size(avail.bytes)}); see that rank's message.")
    raise UserError(refusal_message(recipe, est, avail))


def size(nbytes: Optional[int]) -> str:
    """Bytes for a message: GiB from 1 GiB up, MiB below."""
    if nbytes is None:
        return "unknown"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _all_ranks_agree(fits: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fits
    flag = torch.tensor([1 if fits else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def refusal_message(recipe: Recipe, est: MemoryEstimate, avail: AvailableMemory) -> str:
    """The preflight's UserError text: predicted and available memory, then the fixes."""
    fixes = []
    smoke = smoke_command(recipe.name)
    if smoke:
        fixes.append(f"for a CPU smoke run of {recipe.name}, the README's command:\n      {smoke}")
    else:
        fixes.append("for a CPU smoke run, shrink the recipe as the README's 'CPU smoke runs' commands do "
                     "(model.num_layers, model.model_dim, train.seq_len, train.batch_tokens), or `make run` "
                     "for the tiny recipe")
    best = fitting_micro_batch(recipe, est, avail)
    if best is not None:
        seqs, smaller = best
        fixes.append(f"or keep the recipe and its trajectory, in passes of {seqs} sequences instead of "
                     f"{est.chunk_seqs}: --set train.micro_batch_seqs={seqs} (predicted {size(smaller.total)}, "
                     f"needs {size(needed_bytes(smaller))} with margin)")
    else:
        fixes.append("no train.micro_batch_seqs fits: even one sequence per pass needs more; use a device with "
                     "more memory or a smaller model")
    return (f"not enough memory to train {recipe.name}: predicted peak {size(est.total)} per process, "
            f"{size(needed_bytes(est))} with the {MARGIN[est.device_type]:.0%} margin and "
            f"{size(RESERVE_BYTES[est.device_type])} reserve, but {size(avail.bytes)} available "
            f"({avail.source}); the run would be killed for lack of memory.\n  Predicted: {est.describe()}.\n"
            f"  Fixes:\n  - " + "\n  - ".join(fixes))


def fitting_micro_batch(recipe: Recipe, est: MemoryEstimate, avail: AvailableMemory
                        ) -> Optional[tuple[int, MemoryEstimate]]:
    """The largest train.micro_batch_seqs below the current one whose estimate fits, with that
    estimate. Activations grow about linearly with the sequences per pass, which picks the first
    candidate; each candidate is then estimated for real, smaller ones only if it misses."""
    if avail.bytes is None:
        return None
    per_seq = est.activations / est.chunk_seqs
    room = (avail.bytes - RESERVE_BYTES[est.device_type]) / (1 + MARGIN[est.device_type]) - est.static
    # Linear scaling from the current pass slightly underestimates a smaller pass (its fixed
    # part, such as autocast's weight copies, does not shrink), so the first guess is the largest
    # divisor it lets through and misses only step down.
    candidates = sorted((d for d in _divisors(est.local_seqs) if d < est.chunk_seqs), reverse=True)
    start = next((i for i, d in enumerate(candidates) if d * per_seq <= room), len(candidates) - 1)
    for d in candidates[start:]:
        smaller = estimate_memory(with_micro_batch(recipe, d), est.world_size, est.device_type)
        if needed_bytes(smaller) <= avail.bytes:
            return d, smaller
    return None


def with_micro_batch(recipe: Recipe, seqs: int) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, micro_batch_seqs=seqs))


def smoke_command(name: str, readme: Path = REPO_README) -> Optional[str]:
    """The README's CPU smoke command for recipe `name` (one line), or None if it has none."""
    text = _read(str(readme))
    if not text:
        return None
    lines = text.replace("\\\n", " ").splitlines()
    for line in lines:
        words = line.split()
        if words[:3] == ["pgolf", "run", name]:
            return " ".join(words)
    return None
