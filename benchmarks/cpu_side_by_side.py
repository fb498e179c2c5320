"""CPU speed, side by side: pgolf against the challenge's naive-baseline `train_gpt.py` (issue 11, item 4).

Both train the same 2-layer, 128-wide baseline model (sp1024, 8 micro-steps of 8 x 128 tokens per
step, 300 steps, linear warm-down over the last 60) on tinyshakespeare tokenized with the challenge's
sp1024 tokenizer, in one process each on this machine's CPU, one after the other. It prints, per run
and as medians over `--repeats` alternating runs, both tokens/s, their ratio and both val_bpb.

    # 1. a CPU scratch copy of the baseline script, outside the project (never committed):
    git -C <clone of openai/parameter-golf> show HEAD:train_gpt.py > /tmp/train_gpt_orig.py
    .venv/bin/python benchmarks/cpu_side_by_side.py make-cpu-copy /tmp/train_gpt_orig.py /tmp/train_gpt_cpu.py
    # 2. the comparison:
    PGOLF_BASELINE_SCRIPT=/tmp/train_gpt_cpu.py .venv/bin/python benchmarks/cpu_side_by_side.py run [--repeats 2]

`make-cpu-copy` replaces the script's CUDA calls by CPU ones (device, synchronize, memory counters,
nvidia-smi, NCCL) and, with `--precision fp32` (the default), also runs it in float32 throughout: this
CPU has no bfloat16 arithmetic, so the literal bf16 port (`--precision bf16`) spends its time in
emulated bf16 matmuls, about 20x slower per step here, which measures the emulation rather than the
script. In fp32 the copy keeps everything else of the script, `torch.compile` of the model and of
Newton-Schulz included. Every replacement must match, so a changed upstream file fails loudly.

How it measures (the same for both programs):
- tokens/s = steps x 8,192 tokens / wall, where wall runs from the program's last set-up line (the
  baseline's `seed:` line; pgolf's `train_setup` line) to its line for the last training step, both
  timestamped here as they arrive. It therefore counts compilation, compile-priming (warm-up) steps
  and every training step, and no validation.
- Each run gets a fresh, empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so compile time is the
  cold compile a first run pays. The programs' own step timers (which exclude compile) are printed too.
- val_bpb: the baseline's `final_int8_zlib_roundtrip_exact` and pgolf's `final val_bpb` (both the model
  read back from its compressed artifact, non-overlapping 128-token windows of the same validation
  split) and both pre-quantization figures.
- Both run with this machine's default thread settings; the load average is printed with each run,
  because on a shared machine another process's load slows a 2-thread run far more than its share.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEXT = SHARED / "data" / "tinyshakespeare.txt"
TOKENIZER = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"

STEPS, BATCH_TOKENS = 300, 8192
PGOLF_SETS = ("model.num_layers=2", "model.model_dim=128", "model.num_heads=4", "model.num_kv_heads=2",
              "model.mlp_mult=2", "train.seq_len=128", "train.batch_tokens=8192", "train.reference_world_size=8",
              "train.max_steps={steps}", "train.warmdown_steps=60", "train.warmdown_by=steps",
              "train.max_wallclock_s=0", "train.prime_steps=2", "eval.seq_len=128")
# The baseline reads its settings from the environment (its Hyperparameters class).
BASELINE_ENV = {"NUM_LAYERS": "2", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
                "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192", "ITERATIONS": "{steps}",
                "WARMDOWN_ITERS": "60", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "2", "VAL_LOSS_EVERY": "0",
                "TRAIN_LOG_EVERY": "{steps}", "SEED": "1337"}

# (what, replacement) pairs for make-cpu-copy; each must occur in the original.
CUDA_TO_CPU = (
    ("if not torch.cuda.is_available():", "if False:"),
    ('torch.device("cuda", local_rank)', 'torch.device("cpu")'),
    ("torch.cuda.set_device(device)", "pass"),
    ('backend="nccl", device_id=device', 'backend="gloo"'),
    ('["nvidia-smi"]', '["true"]'),
    ("torch.cuda.synchronize()", "pass"),
    ("torch.cuda.max_memory_allocated()", "0"),
    ("torch.cuda.max_memory_reserved()", "0"),
    ('device_type="cuda"', 'device_type="cpu"'),
)
TO_FP32 = (
    ("dtype=torch.bfloat16, enabled=True", "dtype=torch.bfloat16, enabled=False"),  # autocast off
    (".to(device).bfloat16()", ".to(device)"),  # the model body stays fp32
    ("X = G.bfloat16()", "X = G.float()"),  # Newton-Schulz in fp32
    ("dtype=torch.bfloat16)\n", "dtype=torch.float32)\n"),  # Muon's flat update buffer
)


def make_cpu_copy(original: Path, out: Path, precision: str) -> None:
    src = original.read_text()
    for old, new in CUDA_TO_CPU + (TO_FP32 if precision == "fp32" else ()):
        if old not in src:
            sys.exit(f"make-cpu-copy: {old!r} not found in {original}; is it the challenge's root train_gpt.py?")
        src = src.replace(old, new)
    out.write_text(src)
    print(f"wrote {out} ({precision})")


# ----------------------------------------------------------------------------------------- running


def _timed_lines(cmd: list[str], env: dict, cwd: Path, log_path: Path) -> list[tuple[float, str]]:
    """Run `cmd`, returning (arrival time, line) for every stdout/stderr line; the log keeps them."""
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append((now, line.rstrip("\n")))
            log.write(f"{now:.3f} {line}")
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        sys.exit(f"{shlex.join(cmd)} failed (exit {rc}); log {log_path}:\n{tail}")
    return lines


def _first(lines, pattern: str) -> tuple[float, re.Match]:
    for t, line in lines:
        m = re.search(pattern, line)
        if m:
            return t, m
    sys.exit(f"no line matches {pattern!r}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fresh_env(work: Path, tag: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor_{tag}_", dir=work)
    env["PGOLF_CACHE"] = str(work / "pgolf_cache")
    return env


def run_baseline(script: Path, data: Path, work: Path, steps: int, i: int) -> dict:
    bdata = work / "baseline_data"  # the baseline globs fineweb_{train,val}_*.bin
    bdata.mkdir(exist_ok=True)
    for split in ("train", "val"):
        for shard in sorted(data.glob(f"data_{split}_*.bin")):
            link = bdata / shard.name.replace("data_", "fineweb_", 1)
            if not link.exists():
                link.symlink_to(shard)
    cwd = work / f"baseline_{i}"
    cwd.mkdir()
    env = _fresh_env(work, f"baseline{i}") | {k: v.format(steps=steps) for k, v in BASELINE_ENV.items()}
    env |= {"DATA_PATH": str(bdata), "TOKENIZER_PATH": str(TOKENIZER), "RUN_ID": f"bench{i}"}
    cmd = [sys.executable, str(script)]
    load0 = _load()
    lines = _timed_lines(cmd, env, cwd, work / f"baseline_{i}.log")
    t_setup, _ = _first(lines, r"^seed:\d+")
    t_last, m = _first(lines, rf"^step:{steps}/{steps} train_loss:\S+ train_time:(\d+)ms")
    _, pre = _first(lines, rf"^step:{steps}/{steps} val_loss:\S+ val_bpb:(\S+)")
    _, fin = _first(lines, r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)")
    wall = t_last - t_setup
    return {"cmd": " ".join(f"{k}={env[k]}" for k in BASELINE_ENV) + f" python {script.name}",
            "wall_s": wall, "tok_s": steps * BATCH_TOKENS / wall, "train_time_s": int(m.group(1)) / 1000,
            "val_bpb": float(fin.group(1)), "prequant_bpb": float(pre.group(1)), "load": f"{load0} -> {_load()}"}


def run_pgolf(data: Path, work: Path, steps: int, i: int, extra_sets: list[str]) -> dict:
    sets = [s.format(steps=steps) for s in PGOLF_SETS] + list(extra_sets)
    cmd = [sys.executable, "-m", "pipeline", "run", "baseline", "--data", str(data), "--device", "cpu",
           "--out", str(work / f"pgolf_{i}")]
    for s in sets:
        cmd += ["--set", s]
    load0 = _load()
    lines = _timed_lines(cmd, _fresh_env(work, f"pgolf{i}"), REPO, work / f"pgolf_{i}.log")
    t_setup, _ = _first(lines, r"train_setup ")
    t_last, m = _first(lines, rf"step={steps}/{steps} .*train_time=(\S+)s")
    _, pre = _first(lines, r"prequant_exact .*val_bpb=(\S+)")
    _, fin = _first(lines, r"final val_bpb=(\S+)")
    wall = t_last - t_setup
    return {"cmd": "pgolf run baseline --data DATA " + " ".join(f"--set {s}" for s in sets),
            "wall_s": wall, "tok_s": steps * BATCH_TOKENS / wall, "train_time_s": float(m.group(1)),
            "val_bpb": float(fin.group(1)), "prequant_bpb": float(pre.group(1)), "load": f"{load0} -> {_load()}"}


def prepare_data(work: Path) -> Path:
    out = work / "tinyshakespeare_sp1024"
    subprocess.run([sys.executable, "-m", "pipeline", "data", "prepare", "--text", str(TEXT), "--out", str(out),
                    "--tokenizer", str(TOKENIZER)], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PGOLF_CACHE=str(work / "pgolf_cache")))
    return out


def run(args) -> None:
    script = os.environ.get("PGOLF_BASELINE_SCRIPT")
    if not script or not Path(script).is_file():
        sys.exit("set PGOLF_BASELINE_SCRIPT to the CPU scratch copy of the baseline train_gpt.py "
                 "(see `make-cpu-copy` in this file's docstring)")
    for f in (TEXT, TOKENIZER):
        if not f.exists():
            sys.exit(f"{f} is missing (the shared reference folder beside the checkout)")
    work = Path(tempfile.mkdtemp(prefix="pgolf_side_by_side_", dir=args.work))
    data = prepare_data(work)
    print(f"work={work} torch_threads={_threads()} cpus={os.cpu_count()}", flush=True)
    rows = []
    for i in range(args.repeats):
        # alternate the order so a slow spell of the machine does not always land on the same program
        order = ("baseline", "pgolf") if i % 2 == 0 else ("pgolf", "baseline")
        res = {}
        for who in order:
            res[who] = (run_baseline(Path(script), data, work, args.steps, i) if who == "baseline"
                        else run_pgolf(data, work, args.steps, i, args.set))
            r = res[who]
            print(f"run={i} {who}_tok_s={r['tok_s']:.0f} {who}_wall_s={r['wall_s']:.1f} "
                  f"{who}_train_time_s={r['train_time_s']:.1f} {who}_val_bpb={r['val_bpb']:.4f} "
                  f"{who}_prequant_bpb={r['prequant_bpb']:.4f} load={r['load']}", flush=True)
        rows.append(res)
    med = {who: {k: statistics.median(r[who][k] for r in rows) for k in ("tok_s", "wall_s", "val_bpb", "prequant_bpb")}
           for who in ("baseline", "pgolf")}
    print(f"baseline_cmd={rows[0]['baseline']['cmd']}")
    print(f"pgolf_cmd={rows[0]['pgolf']['cmd']}")
    for who in ("baseline", "pgolf"):
        print(f"{who}_tok_s={med[who]['tok_s']:.0f} {who}_wall_s={med[who]['wall_s']:.1f} "
              f"{who}_val_bpb={med[who]['val_bpb']:.4f} {who}_prequant_bpb={med[who]['prequant_bpb']:.4f}")
    print(f"ratio_tok_s={med['pgolf']['tok_s'] / med['baseline']['tok_s']:.3f} "
          f"bpb_diff={med['pgolf']['val_bpb'] - med['baseline']['val_bpb']:+.4f} repeats={args.repeats}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-cpu-copy", help="write a CPU copy of the baseline train_gpt.py")
    mk.add_argument("original", type=Path)
    mk.add_argument("out", type=Path)
    mk.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    rn = sub.add_parser("run", help="run both and print the figures")
    rn.add_argument("--steps", type=int, default=STEPS)
    rn.add_argument("--repeats", type=int, default=1, help="alternating runs of each; medians are reported")
    rn.add_argument("--work", type=Path, default=None, help="parent of the scratch folder (default: the temp dir)")
    rn.add_argument("--set", action="append", default=[], help="extra pgolf --set (repeatable)")
    args = ap.parse_args()
    if args.cmd == "make-cpu-copy":
        make_cpu_copy(args.original, args.out, args.precision)
    else:
        run(args)


if __name__ == "__main__":
    main()
