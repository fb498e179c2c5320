"""The adversarial battery: bad inputs, faults and interruptions through the real `pgolf` command.

    .venv/bin/python benchmarks/battery.py [--keep DIR]

Each case runs `python -m pipeline ...` in a fresh folder beside a decoy folder it must not touch,
and records: the exit code, whether a Python traceback was printed, whether the message is one
`error:` line, and whether any file appeared or changed outside the case's own output root. It
prints one row per case and a total, as a markdown table (for an issue note). Takes a few minutes
on a laptop CPU (small data, tiny shapes). Not part of the test suite: the tests hold each of these
behaviours on its own; this is the whole battery in one place.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=320", "model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
        "model.num_kv_heads=1", "train.seq_len=32", "train.batch_tokens=256", "train.reference_world_size=1",
        "train.max_steps=12", "train.warmdown_steps=4", "train.log_every=4", "train.checkpoint_every=4",
        "train.max_wallclock_s=0", "eval.seq_len=32", "eval.stride=16", "eval.batch_seqs=32",
        "ttt.chunk_tokens=512", "data.max_val_tokens=2048"]


def sets(*extra):
    out = []
    for s in (*TINY, *extra):
        out += ["--set", s]
    return out


def snapshot(root: Path) -> dict:
    """{path: sha256} of every file under `root`."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def pgolf(args, cwd: Path, interrupt_after: float = 0.0, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PGOLF_CACHE=str(cwd / ".pgolf-cache"), **(env_extra or {}))
    cmd = [sys.executable, "-m", "pipeline", *args]
    if not interrupt_after:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(interrupt_after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def prepare_data(root: Path) -> Path:
    src = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if src.exists():
        text = src.read_text()[:60_000]
    else:
        rng = random.Random(0)
        words = "the king and queen of this realm shall speak to thee now my lord good night".split()
        text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(1500)) + "\n"
    (root / "small.txt").write_text(text)
    proc = pgolf(["data", "prepare", "--text", "small.txt", "--out", "data", "--vocab", "320"], root)
    assert proc.returncode == 0, proc.stderr
    return root / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    top = args.keep or Path(tempfile.mkdtemp(prefix="pgolf-battery-"))
    top.mkdir(parents=True, exist_ok=True)
    data = prepare_data(top)
    tiny_yaml = (REPO / "recipes" / "tiny.yaml").as_posix()
    rows = []

    def case(name, argv, expect, setup=None, interrupt_after=0.0, then=None):
        work = top / f"case{len(rows):02d}"
        (work / "root").mkdir(parents=True)
        decoy = work / "decoy"
        decoy.mkdir()
        (decoy / "keep.txt").write_text("the user's file")
        if setup:
            setup(work / "root")
        before = snapshot(decoy) | {f"../{k}": v for k, v in snapshot(top / "data").items()}
        proc = pgolf(argv, work / "root", interrupt_after)
        if then:
            proc = then(work / "root", proc)
        after = snapshot(decoy) | {f"../{k}": v for k, v in snapshot(top / "data").items()}
        text = proc.stdout + proc.stderr
        one_line = proc.returncode in (0, 130) or proc.stderr.count("error: ") == 1
        rows.append((name, expect, proc.returncode, "Traceback" in text, one_line, before != after,
                     (proc.stderr.strip().splitlines() or [""])[-1][:90]))

    def evil_recipe(name):
        def setup(root):
            (root / "evil.yaml").write_text(f"extends: {tiny_yaml}\nname: \"{name}\"\n")
        return setup

    d = str(data)
    case("recipe name ../../escaped (run)", ["run", "evil.yaml", "--data", d, *sets()], "exit 2",
         evil_recipe("../../escaped"))
    case("recipe name x/../../../../victim (submit)", ["submit", "evil.yaml", "--data", d, *sets()], "exit 2",
         evil_recipe("x/../../../../victim"))
    case("--out is an existing file", ["run", "tiny", "--data", d, "--out", "f.txt", *sets()], "exit 2",
         lambda root: (root / "f.txt").write_text("x"))
    case("--seeds 1,,2", ["submit", "tiny", "--seeds", "1,,2", "--data", d], "exit 2")
    case("--seeds -3", ["submit", "tiny", "--seeds", "-3", "--data", d], "exit 2")
    case("--device cuda:7 without a GPU", ["run", "tiny", "--data", d, "--device", "cuda:7", *sets()], "exit 2")
    for bad in ("eval.stride=0", "eval.stride=999", "eval.batch_seqs=0", "ttt.chunk_tokens=0", "train.log_every=0",
                "model.init=orthogonl", "optim.matrix_lr=abc", "ema.decay=1.0", "model.vocab_size=100000",
                "train.batch_tokens=100", "model.num_heads=3", "quant.rules=[]", "model.rope.dims=7"):
        case(f"check --set {bad}", ["check", "tiny", "--set", bad], "exit 2")
    case("check --set train.compile=on (documented value)", ["check", "tiny", "--set", "train.compile=on"], "exit 0")
    case("check --set optim.matrix_lr=1e6 (a number)", ["check", "tiny", "--set", "optim.matrix_lr=1e6"], "exit 0")
    case("learning rates 1e6: fp16 overflow at export", ["run", "tiny", "--data", d,
                                                          *sets("optim.matrix_lr=1000000", "optim.embed_lr=1000000")],
         "exit 2")
    case("learning rates 1e20: divergence", ["run", "tiny", "--data", d, *sets("optim.matrix_lr=1e20",
                                                                             "optim.embed_lr=1e20")], "exit 2")

    def flip_blob(root, proc):
        (blob,) = list(root.rglob("export/model.bin"))
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 1
        blob.write_bytes(bytes(raw))
        return pgolf(["run", "tiny", "--data", d, *sets()], root)

    case("a flipped byte in the cached blob, rerun", ["run", "tiny", "--data", d, *sets()], "exit 0 (rebuilt)",
         then=flip_blob)

    def truncate_blob(root, proc):
        (blob,) = list(root.rglob("export/model.bin"))
        blob.write_bytes(blob.read_bytes()[:1000])
        return pgolf(["run", "tiny", "--data", d, *sets()], root)

    case("a truncated cached blob, rerun", ["run", "tiny", "--data", d, *sets()], "exit 0 (rebuilt)",
         then=truncate_blob)

    def swap_tokenizer(root):
        shutil.copytree(data, root / "mixed")
        other = root / "other.txt"
        # another text, written in few distinct characters (a 320-piece tokenizer must cover them all)
        rng = random.Random(1)
        words = "a second text with other words in it so that its tokenizer differs from the first".split()
        other.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)) + "\n")
        assert pgolf(["data", "prepare", "--text", "other.txt", "--out", "o", "--vocab", "320"], root).returncode == 0
        shutil.copyfile(root / "o" / "tokenizer.model", root / "mixed" / "tokenizer.model")

    case("another tokenizer copied into a prepared dir", ["run", "tiny", "--data", "mixed", *sets()], "exit 2",
         swap_tokenizer)
    case("prepare into a non-empty user folder", ["data", "prepare", "--text", "../../small.txt", "--out", "mine"],
         "exit 2", lambda root: (root / "mine").mkdir() or (root / "mine" / "notes.txt").write_text("mine"))
    case("SIGINT during training, then rerun", ["run", "tiny", "--data", d, *sets("train.max_steps=200")],
         "exit 130 then 0", interrupt_after=12.0,
         then=lambda root, proc: pgolf(["run", "tiny", "--data", d, *sets("train.max_steps=200")], root))
    case("run on data that does not exist", ["run", "tiny", "--data", "nope", *sets()], "exit 2")
    case("submit sidecar48 on this CPU (memory preflight)", ["submit", "sidecar48", "--data", d,
                                                             "--set", "model.vocab_size=320"], "exit 2")

    print("| case | expected | exit | traceback | one message | files outside root changed | last line |")
    print("|---|---|---|---|---|---|---|")
    for name, expect, code, tb, one, outside, last in rows:
        print(f"| {name} | {expect} | {code} | {'yes' if tb else 'no'} | {'yes' if one else 'no'} | "
              f"{'yes' if outside else 'no'} | {last.replace('|', '/')} |")
    print(f"\ncases={len(rows)} tracebacks={sum(r[3] for r in rows)} "
          f"files_changed_outside_root={sum(r[5] for r in rows)}")
    if args.keep is None:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
