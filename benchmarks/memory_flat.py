"""Peak resident memory of `pgolf data prepare` and of the training loaders, on inputs made here.

    .venv/bin/python benchmarks/memory_flat.py [--mb 100] [--shards 50] [--batches 3000] [--keep DIR]

1. prepare: writes a synthetic JSONL of `--mb` MB (and one of a quarter of that), trains a 1,024-piece
   tokenizer with the challenge's settings on its first 4 MB, and runs what
   `pgolf data prepare --jsonl F --tokenizer M --challenge --val-docs 1000` runs (`prepare_jsonl`)
   on each in a child process with the real 10^8-token shards, then once more at `--mb` with
   10^6-token shards.
   With one uint16 shard buffer, the peak is the interpreter + tokenizer + one batch + at most
   2 bytes per token of one shard (4 with the copy written at a flush), whatever the input's size.
2. loaders: writes `--shards` shards of 2,000,000 tokens and draws `--batches` batches of
   64 x 1,024 tokens from the baseline's SequentialLoader and from PR #684's CoprimeShardLoader in
   child processes.

Each child's peak RSS is `ru_maxrss` of its own rusage (`os.wait4`); the children also sample
their anonymous resident memory (RssAnon in /proc/self/status, Linux) every 20 ms, because
memory-mapped shards count in RSS as file-backed pages, which are the kernel's page cache and
reclaimable, not the process's own. Prints key=value lines. Takes a few minutes on a laptop CPU
(almost all of it tokenizing). Not part of the test suite (tests/test_export_challenge.py holds
the flat-memory property at a tiny size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_SHARD = 2_000_000


# ---- children --------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon every 20 ms on a daemon thread (0 where /proc is absent)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon") if os.path.exists("/proc/self/status") else 0)
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def child_prepare(jsonl: str, tokenizer: str, out: str, shard_size: int, val_docs: int) -> None:
    from pipeline.data.prepare import prepare_jsonl

    anon = AnonPeak()
    meta = prepare_jsonl(Path(jsonl), Path(out), tokenizer_path=Path(tokenizer), val_docs=val_docs, challenge=True,
                         shard_size=shard_size)
    print(json.dumps({"tokens": meta["train_tokens"] + meta["val_tokens"], "shards": meta["train_shards"]
                      + meta["val_shards"], "peak_anon_kb": anon.stop()}))


def child_loader(data: str, kind: str, batches: int) -> None:
    import torch

    from pipeline.config import CoprimeLoaderConfig
    from pipeline.data.coprime_loader import CoprimeShardLoader
    from pipeline.data.loader import SequentialLoader
    from pipeline.data.shards import list_shards

    torch.set_num_threads(1)
    paths = list_shards(Path(data), "train")
    base = _status_kb("VmRSS")
    anon = AnonPeak()
    seq_len, seqs = 1024, 64
    if kind == "sequential":
        loader = SequentialLoader(paths, seq_len, local_tokens=seq_len * seqs)
    else:
        loader = CoprimeShardLoader(paths, seq_len, seqs, cfg=CoprimeLoaderConfig(mix_warmup_batches=batches // 2))
    checksum = 0
    for _ in range(batches):
        x, y = loader.next_batch()
        checksum += int(x[0, 0])  # the batch is really read
    if hasattr(loader, "close"):
        loader.close()
    print(json.dumps({"tokens": batches * seqs * seq_len, "base_rss_kb": base, "peak_anon_kb": anon.stop(),
                      "checksum": checksum}))


# ---- driver ----------------------------------------------------------------------------------

def run_child(*args: str) -> tuple[dict, int]:
    """Run this script as a child; return (its JSON line, its peak RSS in KB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child {args[0]} failed with exit code {proc.returncode}")
    # ru_maxrss is in KB on Linux (bytes on macOS)
    kb = usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return json.loads(out.strip().splitlines()[-1]), kb


def write_jsonl(path: Path, megabytes: float, seed: int) -> int:
    """Synthetic English-like documents (Zipf-distributed pseudo-words, 150-900 words each)."""
    vocab_rng, rng = random.Random(0), random.Random(seed)  # one word list for every file
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(vocab_rng.choice(letters[: vocab_rng.randint(6, 26)]) for _ in range(vocab_rng.randint(1, 9)))
             for _ in range(6000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    target, size, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while size < target:
            body = rng.choices(words, weights, k=rng.randint(150, 900))
            for i in range(12, len(body), rng.randint(8, 20)):
                body[i] += rng.choice([".", ",", ".\n", "\n\n", "?", ";"])
            line = json.dumps({"text": " ".join(body)}) + "\n"
            f.write(line)
            size += len(line)
            docs += 1
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="size of the large JSONL")
    ap.add_argument("--shards", type=int, default=50)
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pgolf_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine cpus={os.cpu_count()} python={sys.version.split()[0]} platform={sys.platform}", flush=True)
        small, large = work / "small.jsonl", work / "large.jsonl"
        n_small = write_jsonl(small, args.mb / 4, 1)
        n_large = write_jsonl(large, args.mb, 2)
        head = work / "head.jsonl"
        with open(large) as src, open(head, "w") as dst:
            size = 0
            for line in src:
                if size > 4e6:
                    break
                dst.write(line)
                size += len(line)
        tok = work / "tok.model"
        sys.path.insert(0, str(REPO))
        from pipeline.data.tokenizer_train import train_tokenizer_file

        train_tokenizer_file(head, 1024, "challenge", tok)
        for jsonl, n_docs, shard_size in ((small, n_small, 10**8), (large, n_large, 10**8), (large, n_large, 10**6)):
            t0 = time.perf_counter()
            res, kb = run_child("_prepare", str(jsonl), str(tok), str(work / f"out_{jsonl.stem}_{shard_size}"),
                                str(shard_size), str(max(1, min(1000, n_docs // 10))))
            print(f"prepare input_mb={jsonl.stat().st_size / 1e6:.1f} docs={n_docs} tokens={res['tokens']} "
                  f"shard_size={shard_size} shards={res['shards']} peak_rss_mb={kb / 1024:.0f} "
                  f"peak_anon_mb={res['peak_anon_kb'] / 1024:.0f} seconds={time.perf_counter() - t0:.0f}", flush=True)
            shutil.rmtree(work / f"out_{jsonl.stem}_{shard_size}")

        import numpy as np

        from pipeline.data.shards import write_shard

        data = work / "shards"
        data.mkdir(exist_ok=True)
        gen = np.random.default_rng(0)
        for i in range(args.shards):
            toks = gen.integers(2, 1024, TOKENS_PER_SHARD, dtype=np.int64)
            toks[:: 700] = 1  # a BOS every 700 tokens
            write_shard(data / f"fineweb_train_{i:06d}.bin", toks)
        total_mb = args.shards * (1024 + 2 * TOKENS_PER_SHARD) / 1e6
        for kind in ("sequential", "coprime"):
            t0 = time.perf_counter()
            res, kb = run_child("_loader", str(data), kind, str(args.batches))
            print(f"loader kind={kind} shards={args.shards} shard_files_mb={total_mb:.0f} batches={args.batches} "
                  f"tokens_read={res['tokens']} base_rss_mb={res['base_rss_kb'] / 1024:.0f} "
                  f"peak_rss_mb={kb / 1024:.0f} peak_anon_mb={res['peak_anon_kb'] / 1024:.0f} "
                  f"seconds={time.perf_counter() - t0:.0f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        child_prepare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_loader":
        child_loader(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
