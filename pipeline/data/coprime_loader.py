"""PR #684's training loader: memory-mapped shards, coprime-stride cursors, adaptive mixing.

Re-implemented from the description in seed_prs.md §3.3 (the same loader ships in PR #726).
Every shard gets a cursor that visits each of its L-token blocks exactly once per cycle in a
scrambled order (a random start plus a stride coprime with the block count). Each global batch
mixes a growing number of shards, drawn with weight ∝ remaining_blocks^alpha, and interleaves
them so that neighbouring sequences rarely come from the same document. Every rank plans the
same global batch (the RNG is seeded from the file list, not from the run seed) and keeps
windows r, r + world, ... of it.

Use:
    seqs = global_seqs_per_micro_step(batch_tokens, seq_len, grad_accum_steps, world_size)
    loader = CoprimeShardLoader(paths, seq_len, seqs, rank, world_size, cfg, device="cuda")
    x, y = loader.next_batch()          # once per micro-step; int64 [seqs // world, seq_len]
    ckpt["loader"] = loader.state_dict()  # state of the batches *consumed* so far
    loader.load_state_dict(ckpt["loader"])
    loader.close()                      # stops the prefetch thread (#684 never did)

Layers: `mix_schedule` and `WindowPlanner` are pure and deterministic (which windows form
batch k); `read_windows` does the memory-mapped I/O; `CoprimeShardLoader` adds the prefetch
thread and, on CUDA, the pinned-memory copy-stream staging (`train.coprime.copy_stream`).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.config import CoprimeLoaderConfig
from pipeline.data.shards import check_token_ids, load_shard, read_header
from pipeline.errors import UserError

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def order_seed(names: Sequence[str], n_tokens: Sequence[int]) -> int:
    """64-bit FNV-1a over the shard base names and token counts.

    Why not the run seed: every rank and every seed of a multi-seed study must see the same
    data order (PR #684 / #726 do the same), so seed variance measures the model, not the data.
    Base names (not full paths) keep the order stable when the data directory moves.
    """
    h = _FNV_OFFSET
    for name, n in zip(names, n_tokens):
        for byte in f"{name}\x00{int(n)}\n".encode():
            h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def mix_schedule(batches_built: int, world_size: int, n_shards: int, batch_seqs: int,
                 cfg: CoprimeLoaderConfig = CoprimeLoaderConfig()) -> tuple[float, int]:
    """(alpha, mix width) for the global batch numbered `batches_built` (0-based)."""
    warm = cfg.mix_warmup_batches
    progress = 1.0 if warm <= 0 else min(batches_built / warm, 1.0)
    alpha = cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * progress
    cap = min(n_shards, batch_seqs)
    # hi scales with the world (8 GPUs -> 64, not the README's 32), as in PR #684.
    lo = min(max(8, world_size), cap)
    hi = min(max(32, 8 * world_size), cap)
    width = max(1, min(int(round(lo + progress * (hi - lo))), cap))
    return alpha, width


def global_seqs_per_micro_step(batch_tokens: int, seq_len: int, grad_accum_steps: int,
                               world_size: int) -> int:
    """The `global_batch_seqs` to pass when the trainer calls next_batch once per micro-step.

    batch_tokens is per optimizer step over all ranks and micro-steps. As in PR #684 each rank
    gets floor(batch_tokens / (world * accum * seq_len)) sequences; a remainder is dropped.
    Note the mixing schedule counts next_batch calls, i.e. micro-steps, not optimizer steps.
    """
    per_rank = batch_tokens // (world_size * grad_accum_steps * seq_len)
    if per_rank < 1:
        raise UserError(
            f"train.batch_tokens={batch_tokens} is too small for seq_len={seq_len} x "
            f"world_size={world_size} x grad_accum={grad_accum_steps}; raise batch_tokens.")
    return per_rank * world_size


class WindowPlanner:
    """The pure part: which (shard, token offset) windows make up each global batch.

    All randomness comes from one PCG64 generator, so the plan depends only on the shard sizes,
    seq_len, batch size, world size, config and seed; its full state is a few small lists.
    """

    def __init__(self, n_tokens: Sequence[int], seq_len: int, global_batch_seqs: int,
                 world_size: int, seed: int, cfg: CoprimeLoaderConfig = CoprimeLoaderConfig()):
        self.n_tokens = [int(n) for n in n_tokens]
        self.seq_len, self.batch_seqs, self.world_size = seq_len, global_batch_seqs, world_size
        self.cfg, self.seed = cfg, seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        k = len(self.n_tokens)
        # Cursor per shard; blocks == 0 marks "not started". Cursors start lazily, when a shard
        # is first drawn (as in PR #684), so unused shards consume no random numbers.
        self.phase, self.blocks, self.start = [0] * k, [0] * k, [0] * k
        self.stride, self.used = [1] * k, [0] * k
        self.batches_built = 0

    def _reset_cursor(self, si: int) -> None:
        n, L = self.n_tokens[si], self.seq_len
        # The phase shifts block boundaries between cycles so the same tokens do not always
        # start a sequence; its cap keeps at least one whole L+1 window in the shard.
        max_phase = min(L - 1, n - L - 1)
        phase = int(self.rng.integers(max_phase + 1))
        m = (n - 1 - phase) // L
        stride = 1
        while m > 1:  # rejection sampling: coprime strides are dense, so this ends fast
            stride = int(self.rng.integers(1, m))
            if math.gcd(stride, m) == 1:
                break
        self.phase[si], self.blocks[si], self.used[si] = phase, m, 0
        self.start[si] = int(self.rng.integers(m)) if m > 1 else 0
        self.stride[si] = stride

    def remaining(self, si: int) -> int:
        if self.blocks[si] == 0:
            return (self.n_tokens[si] - 1) // self.seq_len
        return self.blocks[si] - self.used[si]

    def take(self, si: int, count: int) -> list[int]:
        """The next `count` window offsets of shard `si`, starting a new cycle as needed."""
        out: list[int] = []
        while len(out) < count:
            if self.blocks[si] == 0 or self.used[si] >= self.blocks[si]:
                self._reset_cursor(si)
            m, i = self.blocks[si], self.used[si]
            n = min(count - len(out), m - i)
            # gcd(stride, m) == 1 makes i -> (start + i*stride) mod m a bijection on [0, m).
            out.extend(self.phase[si] + ((self.start[si] + j * self.stride[si]) % m) * self.seq_len
                       for j in range(i, i + n))
            self.used[si] = i + n
        return out

    def plan(self) -> list[tuple[int, int]]:
        """Advance by one global batch; returns its windows in rank-interleaved order."""
        n_sh, B = len(self.n_tokens), self.batch_seqs
        alpha, width = mix_schedule(self.batches_built, self.world_size, n_sh, B, self.cfg)
        # A drained cursor weighs 1, not its next full cycle: shards that still hold unseen
        # blocks are preferred, so coverage of the whole set stays roughly epoch-like.
        rem = np.array([max(self.remaining(s), 1) for s in range(n_sh)], dtype=np.float64)
        probs = rem ** alpha
        probs /= probs.sum()
        chosen = self.rng.choice(n_sh, size=width, replace=False, p=probs)
        share = probs[chosen] / probs[chosen].sum()
        # One window each guarantees exactly `width` distinct shards in the batch.
        counts = 1 + self.rng.multinomial(B - width, share)
        buckets = []
        for si, c in zip(chosen.tolist(), counts.tolist()):
            offs = self.take(si, c)
            buckets.append([(si, offs[j]) for j in self.rng.permutation(c).tolist()])
        # Round-robin in a fresh order each round, so the ranks' slices (stride = world) each
        # get a spread of shards and adjacent rows seldom share a document.
        windows, rnd, live = [], 0, list(range(len(buckets)))
        while live:
            windows.extend(buckets[live[j]][rnd] for j in self.rng.permutation(len(live)).tolist())
            rnd += 1
            live = [b for b in live if len(buckets[b]) > rnd]
        self.batches_built += 1
        return windows

    def _identity(self) -> dict:
        # What a checkpoint must match: resuming with other files or shapes would silently
        # replay a different data order.
        return {"seed": self.seed, "n_shards": len(self.n_tokens), "seq_len": self.seq_len,
                "batch_seqs": self.batch_seqs, "world_size": self.world_size}

    def state_dict(self) -> dict:
        # Plain Python ints and lists only, so torch.load(weights_only=True) accepts it.
        return {**self._identity(), "rng": self.rng.bit_generator.state, "phase": list(self.phase),
                "blocks": list(self.blocks), "start": list(self.start),
                "stride": list(self.stride), "used": list(self.used),
                "batches_built": self.batches_built}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in self._identity().items():
            if sd[key] != mine:
                raise UserError(
                    f"loader checkpoint has {key}={sd[key]} but this run has {mine}; resume "
                    f"with the same shard files, seq_len, batch size and world size.")
        self.rng.bit_generator.state = sd["rng"]
        for key in ("phase", "blocks", "start", "stride", "used"):
            setattr(self, key, [int(v) for v in sd[key]])
        self.batches_built = int(sd["batches_built"])


def read_windows(tokens: Sequence[np.ndarray], windows: Sequence[tuple[int, int]], span: int,
                 merge_gap: Optional[int], out: Optional[np.ndarray] = None) -> np.ndarray:
    """Copy each (shard, offset) window of `span` tokens into row i of a uint16 array.

    Windows of one shard are read in offset order and runs whose gap is <= merge_gap tokens
    become one slab copy: a sequential read of a few wasted tokens beats a page-cache seek per
    window (PR #684 uses L/2). merge_gap=None reads every window on its own.
    """
    out = np.empty((len(windows), span), dtype=np.uint16) if out is None else out
    order = sorted(range(len(windows)), key=lambda i: windows[i])
    i = 0
    while i < len(order):
        si, lo = windows[order[i]]
        hi, j = lo + span, i + 1
        while (merge_gap is not None and j < len(order) and windows[order[j]][0] == si
               and windows[order[j]][1] - hi <= merge_gap):
            hi = max(hi, windows[order[j]][1] + span)
            j += 1
        slab = np.array(tokens[si][lo:hi])  # the one copy out of the memmap
        for t in order[i:j]:
            off = windows[t][1] - lo
            out[t] = slab[off:off + span]
        i = j
    return out


class CoprimeShardLoader:
    """Serves (x, y) int64 batches of shape [global_batch_seqs // world_size, seq_len].

    global_batch_seqs counts sequences over all ranks for one next_batch call (one micro-step);
    see global_seqs_per_micro_step.
    """

    def __init__(self, shard_paths: Sequence, seq_len: int, global_batch_seqs: int, rank: int = 0,
                 world_size: int = 1, cfg: CoprimeLoaderConfig = CoprimeLoaderConfig(),
                 device="cpu", background: bool = True, vocab_size: Optional[int] = None):
        paths = [os.fspath(p) for p in shard_paths]
        if not paths:
            raise UserError("the coprime loader got no train shards; run `pgolf data prepare` "
                            "or point data.dir at a directory with *_train_*.bin files.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is out of range for world_size {world_size}.")
        if global_batch_seqs < world_size or global_batch_seqs % world_size:
            raise UserError(f"global_batch_seqs={global_batch_seqs} must be a positive multiple "
                            f"of world_size={world_size}; adjust train.batch_tokens.")
        n_tokens = [read_header(p) for p in paths]
        for p, n in zip(paths, n_tokens):
            if n < seq_len + 2:
                raise UserError(f"{p}: shard has {n} tokens but the coprime loader needs at "
                                f"least seq_len + 2 = {seq_len + 2}; drop it or lower seq_len.")
        self._tokens = [load_shard(p) for p in paths]
        self._paths, self.vocab_size = paths, vocab_size  # every window read is checked against vocab_size
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.local_seqs = global_batch_seqs // world_size
        self.device = torch.device(device)
        # Pinned buffers + copy stream (cfg.copy_stream): auto = on with CUDA. "on" elsewhere is a
        # user error rather than a silent plain copy; "off" on CUDA copies synchronously.
        if cfg.copy_stream == "on" and self.device.type != "cuda":
            raise UserError(f"train.coprime.copy_stream=on needs a CUDA device (this run trains on "
                            f"{self.device.type}); use auto or off.")
        self._cuda = self.device.type == "cuda" and cfg.copy_stream != "off"
        self._depth = max(1, cfg.queue_depth)
        seed = order_seed([os.path.basename(p) for p in paths], n_tokens)
        self.planner = WindowPlanner(n_tokens, seq_len, global_batch_seqs, world_size, seed, cfg)
        self.background = background
        self._consumed = self.planner.state_dict()
        self._staged = None
        self._thread: Optional[threading.Thread] = None
        self._start_worker()

    # ---- CPU side: plan + read, optionally on a daemon thread -------------------------------

    def _produce(self):
        windows = self.planner.plan()[self.rank::self.world_size]
        span = self.seq_len + 1
        if self._cuda:  # pinned, so the H2D copy can be truly asynchronous
            buf = torch.empty((self.local_seqs, span), dtype=torch.uint16, pin_memory=True)
        else:
            buf = torch.empty((self.local_seqs, span), dtype=torch.uint16)
        read_windows(self._tokens, windows, span, self.seq_len // 2, out=buf.numpy())
        if self.vocab_size is not None and int(buf.numpy().max()) >= self.vocab_size:
            row = int(np.flatnonzero(buf.numpy().max(axis=1) >= self.vocab_size)[0])
            si, lo = windows[row]
            check_token_ids(buf.numpy()[row], self.vocab_size, f"{self._paths[si]} (tokens {lo}..{lo + span})")
        # The planner state *after* this batch travels with it, so state_dict can report the
        # consumed position even though the thread runs up to queue_depth batches ahead.
        return self.planner.state_dict(), buf

    def _worker(self, stop: threading.Event, q: queue.Queue) -> None:
        try:
            while not stop.is_set():
                item = self._produce()
                while not stop.is_set():
                    try:
                        q.put(("ok", item), timeout=0.05)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # surfaced to the trainer on its next next_batch call
            q.put(("error", e))

    def _start_worker(self) -> None:
        if not self.background:
            return
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self._depth)
        self._thread = threading.Thread(target=self._worker, args=(self._stop, self._queue),
                                        name="coprime-loader", daemon=True)
        self._thread.start()

    def _next_cpu(self):
        if self._thread is None:
            if self.background:
                raise RuntimeError("CoprimeShardLoader used after close()")
            return self._produce()
        kind, item = self._queue.get()
        if kind == "error":
            raise item
        return item

    # ---- device side ------------------------------------------------------------------------

    def _stage(self) -> None:
        state, buf = self._next_cpu()
        if not self._cuda:
            w = buf.to(self.device).to(torch.int64)
            self._staged = (state, w[:, :-1].contiguous(), w[:, 1:].contiguous(), None)
            return
        if not hasattr(self, "_copy_stream"):
            self._copy_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._copy_stream):
            w = buf.to(self.device, non_blocking=True).to(torch.int64)
            x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._staged = (state, x, y, ready)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._staged is None:
            self._stage()
        state, x, y, ready = self._staged
        self._staged = None
        if ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            # x, y were allocated on the copy stream; tell the caching allocator the consumer
            # stream uses them so their memory is not recycled while compute still reads it.
            x.record_stream(consumer)
            y.record_stream(consumer)
            self._stage()  # overlap the next H2D copy with this step's compute
        self._consumed = state
        return x, y

    # ---- resume / shutdown ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return dict(self._consumed)

    def load_state_dict(self, sd: dict) -> None:
        # Prefetched batches belong to the old position: stop the thread, drop them, restart.
        self._stop_worker()
        self._staged = None
        self.planner.load_state_dict(sd)
        self._consumed = self.planner.state_dict()
        self._start_worker()

    def _stop_worker(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put() that raced with the stop flag
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self._stop_worker()
        self._staged = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
