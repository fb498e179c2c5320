"""`pgolf submit`: run the shipped train_gpt.py for every seed and build a challenge records folder
from that script's own logs.

    records/<track>/<YYYY-MM-DD>_<recipe>/
        README.md  submission.json  train_gpt.py  train_seed<N>.log ...  *.png

For each seed it runs the generated `train_gpt.py` itself (`python train_gpt.py`, or `torchrun
--standalone --nproc_per_node=N train_gpt.py`) with the challenge's environment variables
(DATA_PATH, TOKENIZER_PATH, SEED, RUN_ID); `train_seed<N>.log` is that script's output, and every
per-seed figure in submission.json is read back from it. Seeds already done (a complete log whose
blob is still intact) are not redone. Before any compute it refuses a recipe that could not be a
legal entry (train-then-score TTT, a known leak, a capped validation set, a failed `pgolf audit`, a
validation set that is not the challenge's, validation documents that also occur in training:
`pgolf data audit`). After the runs every seed must pass the gates
(`gate_problems`): bytes ≤ 16,000,000, training and evaluation ≤ 600 s each as the script measured
them (record track), score-first TTT, one validation fingerprint. A run on anything but 8×H100 goes
to `records/track_non_record_16mb/` with its hardware named. Statistics follow the challenge's rule
(pipeline.stats, pipeline.compare). The folder is built under a staging name and renamed into place;
an existing folder is never replaced (the new one gets a free name).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipeline.codegen import extra_needs, script_codec, write_train_gpt
from pipeline.stats import fixed8
from pipeline.config import Recipe
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, file_sha256, write_json_atomic
from pipeline.provenance import safe_join
from pipeline.stages.report import parse_summary

TRACKS = {"record": "track_10min_16mb", "non_record": "track_non_record_16mb"}
TRAIN_CAP_S = 600.0
EVAL_CAP_S = 600.0
RECORD_HARDWARE = "8xH100"
FIGURES = ("val_bpb", "val_loss", "bytes_total", "train_time_s", "eval_time_s")


def legality_problems(recipe: Recipe) -> list[str]:
    """Why this recipe could not be a legal entry, from its settings alone (checked before compute)."""
    problems = []
    if recipe.ttt.enabled and recipe.ttt.mode == "pre_score_full_val":
        problems.append(f"ttt.mode={recipe.ttt.mode} trains on validation tokens before scoring them; "
                        f"use ttt.mode=score_first")
    if recipe.model.leaky_selective_state:
        problems.append("model.leaky_selective_state=true leaks future tokens; set it to false")
    if recipe.data.max_val_tokens:
        problems.append("data.max_val_tokens caps the validation set; a submission scores all of it (set 0)")
    if recipe.eval.mode == "pr298_all_positions":
        problems.append("eval.mode=pr298_all_positions is not the challenge's scoring; use sliding")
    return problems


# ------------------------------------------------------------------------------------ one seed's log


@dataclass
class SeedLog:
    seed: int
    path: Path
    figures: dict  # the report stage's `summary` lines
    losses: list = field(default_factory=list)  # (step, training loss) of the logged steps
    groups: dict = field(default_factory=dict)  # export group -> compressed bytes (alone)


def parse_seed_log(seed: int, path: Path) -> SeedLog:
    """The figures train_gpt.py printed; UserError when the log has no complete report."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    figures = parse_summary(lines)
    missing = [k for k in ("val_bpb", "val_loss", "bytes_total", "artifact_sha256", "val_sha256") if k not in figures]
    if missing or not any(line.startswith("final val_bpb=") for line in lines):
        raise UserError(f"{path} is not a complete train_gpt.py log (no final line or no {missing}); "
                        "rerun the seed")
    log = SeedLog(seed, path, figures)
    for line in lines:
        if line.startswith("step="):
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            try:
                log.losses.append((int(fields["step"].split("/")[0]), float(fields["loss"])))
            except (KeyError, ValueError):
                continue
        elif line.startswith("export_group "):
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            log.groups[fields.get("group", "?")] = int(fields.get("compressed_bytes", 0))
    return log


def seed_done(seed: int, log_path: Path, work_dir: Path) -> Optional[SeedLog]:
    """The seed's parsed log when it finished and its blob is intact (same sha256, same size)."""
    if not log_path.is_file():
        return None
    try:
        log = parse_seed_log(seed, log_path)
    except UserError:
        return None
    blob = work_dir / "final_model.bin"
    if not blob.is_file() or blob.stat().st_size != log.figures.get("bytes_model") \
            or file_sha256(blob) != log.figures.get("artifact_sha256"):
        return None
    return log


def run_seed(script: Path, seed: int, data_dir: Path, tokenizer: Path, work_dir: Path, nproc: int, device: str,
             log_path: Path, echo: Callable[[str], None]) -> None:
    """Run the shipped script for one seed in the records folder, its output teed to `log_path`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script.name]
    else:
        cmd = [sys.executable, script.name]
    env = dict(os.environ, DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer), SEED=str(seed),
               RUN_ID=f"{script.parent.name}_seed{seed}", OUT_DIR=str(work_dir), PYTHONUNBUFFERED="1")
    if device != "auto":
        env["PGOLF_DEVICE"] = device
    partial = log_path.with_name(log_path.name + ".partial")
    echo(f"seed {seed}: {' '.join(cmd)} (in {script.parent})")
    with open(partial, "w") as out:
        proc = subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                echo(line.rstrip("\n"))
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        failed = log_path.with_name(f"train_seed{seed}.failed.log")
        os.replace(partial, failed)
        raise UserError(f"seed {seed}: train_gpt.py exited with code {code}; its output is in {failed}")
    os.replace(partial, log_path)


# ------------------------------------------------------------------------------------ gates


def hardware_of(logs: list[SeedLog]) -> tuple[str, str]:
    """(track, hardware description) from what the scripts logged: the record track needs 8×H100."""
    kinds = {(log.figures.get("world_size"), log.figures.get("device_name"), log.figures.get("device")) for log in logs}
    world, name, device = sorted(kinds, key=str)[0]
    hardware = f"{world}x {name}" if str(device).startswith("cuda") else f"{world}x CPU ({name})"
    on_h100 = len(kinds) == 1 and world == 8 and str(device).startswith("cuda") and "H100" in str(name)
    return ("record" if on_h100 else "non_record"), hardware


def gate_problems(logs: list[SeedLog], track: str) -> list[str]:
    """Every reason, per seed, that these runs cannot be submitted to `track` ([] = all gates pass)."""
    problems = []
    for log in logs:
        f, s = log.figures, f"seed {log.seed}"
        if f["bytes_total"] > f.get("cap_bytes", 16_000_000) or f["bytes_total"] > 16_000_000:
            problems.append(f"{s}: bytes_total {f['bytes_total']:,} > 16,000,000")
        if not f.get("ttt_compliant", False):
            problems.append(f"{s}: TTT was not score-first (trained on validation tokens before scoring them)")
        if not f.get("causal", False):
            problems.append(f"{s}: the model is not causal")
        if track == "record":
            if f["train_time_s"] > TRAIN_CAP_S:
                problems.append(f"{s}: training took {f['train_time_s']:.1f} s > {TRAIN_CAP_S:.0f} s")
            if f["eval_time_s"] > EVAL_CAP_S:
                problems.append(f"{s}: evaluation took {f['eval_time_s']:.1f} s > {EVAL_CAP_S:.0f} s")
    prints = {(log.figures["val_sha256"], log.figures.get("val_token_count")) for log in logs}
    if len(prints) > 1:
        problems.append(f"the seeds scored different validation sets: {sorted(p[0][:12] for p in prints)}")
    return problems


def compliance(logs: list[SeedLog], track: str) -> dict:
    f = [log.figures for log in logs]
    return {
        "track": track,
        "train_under_600s": all(x["train_time_s"] <= TRAIN_CAP_S for x in f),
        "eval_under_600s": all(x["eval_time_s"] <= EVAL_CAP_S for x in f),
        "artifact_under_16mb": all(x["bytes_total"] <= 16_000_000 for x in f),
        "score_first_ttt": all(x.get("ttt_compliant", False) for x in f),
        "causal": all(x.get("causal", False) for x in f),
        "one_validation_set": len({x["val_sha256"] for x in f}) == 1,
        "three_seeds": len(f) >= 3,
    }


# ------------------------------------------------------------------------------------ the folder


def summarize(recipe: Recipe, logs: list[SeedLog], track: str, hardware: str, code_bytes: int,
              comparison: Optional[dict] = None) -> dict:
    """submission.json (pg_mechanics.md §5.2): per-seed figures from the logs, mean, sample std and
    95% t-interval of each figure, and the computed compliance values."""
    from pipeline.stats import describe

    f = {log.seed: log.figures for log in logs}
    stats = {k: describe([x[k] for x in f.values()], what=k) for k in FIGURES}
    totals = [x["bytes_total"] for x in f.values()]
    return {
        "name": recipe.name, "blurb": recipe.description, "date": time.strftime("%Y-%m-%d"),
        "track": "10min_16mb" if track == "record" else "non_record_16mb",
        "val_bpb": stats["val_bpb"]["mean"], "val_loss": stats["val_loss"]["mean"],
        "val_bpb_std": stats["val_bpb"]["std"], "val_loss_std": stats["val_loss"]["std"],
        "statistics": stats, "seeds": list(f),
        "seed_results": {str(seed): {"val_loss": x["val_loss"], "val_bpb": x["val_bpb"],
                                     "val_bpb_prequant": x["val_bpb_prequant"],
                                     "val_bpb_roundtrip": x["val_bpb_roundtrip"], "val_bpb_ttt": x["val_bpb_ttt"],
                                     "artifact_bytes": x["bytes_total"], "bytes_model": x["bytes_model"],
                                     "steps": x["steps"], "step_avg_ms": 1000 * x["train_time_s"] / max(x["steps"], 1),
                                     "train_time_s": x["train_time_s"], "eval_time_s": x["eval_time_s"],
                                     "artifact_sha256": x["artifact_sha256"],
                                     "clip_scale": x.get("clip_scale"),  # quant.fit_clip's, None without it
                                     "log": f"train_seed{seed}.log"}
                         for seed, x in f.items()},
        "bytes_total": max(totals), "bytes_code": code_bytes,
        "artifact_bytes_mean": stats["bytes_total"]["mean"], "artifact_bytes_max": max(totals),
        "train_steps_mean": sum(x["steps"] for x in f.values()) / len(f),
        "val_bpb_method": f"{recipe.eval.mode} seq_len={recipe.eval.seq_len} stride={recipe.eval.stride}"
                          + (f" + score-first TTT ({recipe.ttt.optimizer}, {recipe.ttt.epochs} epoch(s) per chunk)"
                             if recipe.ttt.enabled and recipe.ttt.mode == "score_first" else "")
                          + (f" + phased per-document LoRA TTT (rank {recipe.ttt.lora_rank}, {recipe.ttt.phases} "
                             f"phase(s) over {recipe.ttt.phase_prefix_docs} documents)"
                             if recipe.ttt.enabled and recipe.ttt.mode == "phased_lora" else ""),
        "validation": {"sha256": next(iter(f.values()))["val_sha256"],
                       "tokens": next(iter(f.values()))["val_token_count"],
                       "byte_source": next(iter(f.values())).get("byte_source")},
        "tokenizer_sha256": next(iter(f.values())).get("tokenizer_sha256"),
        "vocab_size": next(iter(f.values())).get("vocab_size"),
        "hardware": hardware, "pytorch_version": next(iter(f.values())).get("torch_version"),
        "compliance": compliance(logs, track),
        "comparison": comparison,
    }


def launch_command(data_dir: Path, tokenizer: Path, nproc: int, device: str) -> str:
    """How `run_seed` starts the script, as a shell line (SEED=<seed>; data paths by their last part)."""
    env = f"DATA_PATH=.../{data_dir.name} TOKENIZER_PATH=.../{tokenizer.name} SEED=<seed>"
    env += f" PGOLF_DEVICE={device}" if device != "auto" else ""
    runner = f"torchrun --standalone --nproc_per_node={nproc}" if nproc > 1 else "python"
    return f"{env} {runner} train_gpt.py"


def _readme(recipe: Recipe, summary: dict, hardware: str, script_text: str, launch: str) -> str:
    rows = "\n".join(f"| {s} | {v['val_bpb']:.8f} | {v['val_loss']:.8f} | {v['artifact_bytes']:,} | {v['steps']} | "
                     f"{v['train_time_s']:.1f} | {v['eval_time_s']:.1f} |" for s, v in summary["seed_results"].items())
    st = summary["statistics"]["val_bpb"]
    interval = (f"95% t-interval [{st['ci95_low']:.8f}, {st['ci95_high']:.8f}]" if st["ci95_low"] is not None
                else st["note"])
    compare = ""
    if summary.get("comparison"):
        compare = "\n## Against the baseline\n\n```\n" + "\n".join(summary["comparison"]["lines"]) + "\n```\n"
    vocab = recipe.model.vocab_size  # the challenge's names for its exports (the script's defaults too)
    track_note = "" if summary["track"] == "10min_16mb" else (
        f"\nNon-record submission: run on {hardware}, not 8×H100, so the 10-minute limits are reported, "
        "not enforced.\n")
    return f"""# {recipe.name}

{recipe.description}

Generated by pgolf from the recipe `{recipe.name}`. Every figure below was read from the logs
`train_seed<N>.log`, which are the output of the `train_gpt.py` in this folder. Scores are of the
model read back from the compressed artifact: {summary['val_bpb_method']}.
{track_note}
| seed | val_bpb | val_loss | artifact bytes | steps | train s | eval s |
|---|---|---|---|---|---|---|
{rows}

Mean val_bpb **{summary['val_bpb']:.8f}** (sample std {fixed8(summary['val_bpb_std'])}; {interval}).
Hardware: {hardware}.
{compare}
## Run

The logs here were written by this command, once per seed, in this folder (the data paths were the
running machine's):

    {launch}

On the challenge's machine (8×H100), with its exports for this vocabulary:

    DATA_PATH=./data/datasets/fineweb10B_sp{vocab} TOKENIZER_PATH=./data/tokenizers/fineweb_{vocab}_bpe.model \\
    SEED=1337 torchrun --standalone --nproc_per_node=8 train_gpt.py

`train_gpt.py` is self-contained ({summary['bytes_code']:,} bytes): it needs torch, numpy, sentencepiece,
zstandard{extra_needs(recipe, script_codec(script_text))}.

## Compliance (computed from the logs)

```
{json.dumps(summary['compliance'], indent=2)}
```
"""


def _preflight_seeds(recipe: Recipe, device: str, nproc: int, echo: Callable[[str], None]) -> None:
    """Refuse, before any seed runs, a recipe whose training cannot fit the device the seeds will
    run on (each of `nproc` processes)."""
    import torch

    from pipeline.distributed import DistInfo
    from pipeline.preflight import preflight

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        dev = torch.device("cuda", int(device.split(":")[1]) if ":" in device else 0)
    else:
        dev = torch.device("cpu")
    preflight(recipe, DistInfo(rank=0, world_size=nproc, local_rank=0, device=dev), log=echo)


def _free_name(parent: Path, name: str) -> Path:
    """`parent/name`, or `parent/name_2`, `_3`, ... if taken: never replace a user's folder."""
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}_{n}"
    return candidate


def _check_baseline(against: Path, n_seeds: int) -> None:
    """Refuse, before any seed runs, a `--against` baseline the comparison at the end could not use:
    unreadable, not per-seed values, or one side with fewer than 2 seeds (compare_samples)."""
    from pipeline.compare import load_sample
    from pipeline.stats import require_seeds

    baseline = load_sample(against)
    require_seeds("submit --against: this submit", n_seeds)
    require_seeds(f"submit --against: the baseline {baseline.source}", len(baseline.val_loss))


def submit(recipe_name: str, seeds: list[int], overrides, data_dir: Optional[Path], out_root: Path,
           records_root: Path, device: str = "auto", nproc: int = 1, echo: Callable[[str], None] = print,
           embedded=None, against: Optional[Path] = None) -> Path:
    from pipeline.audit import audit_recipe
    from pipeline.distributed import init
    from pipeline.recipe import load_recipe
    from pipeline.run import identify_data

    if not seeds:
        raise UserError("submit: give at least one seed, e.g. --seeds 1337,42,2025.")
    for seed in seeds:
        load_recipe(recipe_name, overrides, seed)  # each seed within the recipe's bounds for `seed`
    # The script carries the recipe as written (its own seed): every run gets its seed from SEED, so
    # which seeds a submit names must not change the script, or seeds already done would rerun.
    recipe = load_recipe(recipe_name, overrides)
    if against is not None:
        _check_baseline(against, len(seeds))
    problems = legality_problems(recipe)
    if problems:
        raise UserError(f"submit refuses recipe {recipe.name}: " + "; ".join(problems) + ".")
    data_dir = Path(data_dir) if data_dir else (Path(recipe.data.dir) if recipe.data.dir
                                                else embedded(recipe.model.vocab_size))
    tokenizer = data_dir / "tokenizer.model"
    _data, ident, export_problem = identify_data(data_dir, recipe, init("cpu"), echo)
    if export_problem:
        raise UserError(f"submit refuses {data_dir}: {export_problem}.")
    from pipeline.data.audit import audit_data

    data_audit = audit_data(data_dir, tokenizer, eval_seq_len=recipe.eval.seq_len)
    for line in data_audit.lines():
        echo(line)
    if not data_audit.passed:
        raise UserError(f"submit refuses {data_dir}: " + "; ".join(data_audit.problems))
    audit = audit_recipe(recipe, seed=recipe.seed)
    if not audit.passed:
        raise UserError(f"submit refuses recipe {recipe.name}: it fails `pgolf audit` "
                        f"({'; '.join(line for line in audit.lines() if 'FAIL' in line)})")
    echo(f"audit {recipe.name}: PASS")
    _preflight_seeds(recipe, device, nproc, echo)

    # The seeds run in a folder laid out as the records folder (train_gpt.py beside its logs), kept
    # under --out so an interrupted submit resumes; the records folder is assembled at the end.
    staging = safe_join(out_root, recipe.name, f"submit-{ident['tag']}")
    staging.mkdir(parents=True, exist_ok=True)
    script = staging / "train_gpt.py"
    fresh = staging / ".train_gpt.new"
    code_bytes = write_train_gpt(recipe, fresh)
    if script.exists() and file_sha256(script) != file_sha256(fresh):
        # Logs of another script are not this script's output: set them aside.
        stale = staging / f"stale-{time.strftime('%Y%m%d-%H%M%S')}"
        stale.mkdir()
        for old in staging.glob("train_seed*.log"):
            os.replace(old, stale / old.name)
        echo(f"train_gpt.py changed since the last submit of {recipe.name}; earlier seed logs moved to {stale}")
    os.replace(fresh, script)

    logs = []
    for seed in seeds:
        work = staging / f"seed{seed}"
        log_path = staging / f"train_seed{seed}.log"
        done = seed_done(seed, log_path, work)
        if done is not None:
            sha = done.figures["artifact_sha256"][:12]
            echo(f"seed {seed}: already done ({log_path.name}, artifact {sha}… intact)")
            logs.append(done)
            continue
        run_seed(script, seed, data_dir.resolve(), tokenizer.resolve(), work, nproc, device, log_path, echo)
        log = seed_done(seed, log_path, work)
        if log is None:
            raise UserError(f"seed {seed}: {log_path} does not describe the blob in {work}; rerun the seed")
        logs.append(log)

    track, hardware = hardware_of(logs)
    problems = gate_problems(logs, track)
    if problems:
        raise UserError("submit refuses: " + "; ".join(problems) + f". The seed logs are kept in {staging}.")
    comparison = None
    if against is not None:
        from pipeline.compare import compare_against

        first = logs[0].figures
        result = compare_against([log.figures["val_loss"] for log in logs], against,
                                 new_val_bpb=[log.figures["val_bpb"] for log in logs], new_seeds=seeds,
                                 new_tokenizer={"tokenizer_sha256": first.get("tokenizer_sha256"),
                                                "vocab_size": first.get("vocab_size")})
        comparison = {"baseline": str(against), "lines": result.lines()}
        for line in comparison["lines"]:
            echo(line)
    summary = summarize(recipe, logs, track, hardware, code_bytes, comparison)
    parent = safe_join(records_root, TRACKS[track])
    parent.mkdir(parents=True, exist_ok=True)
    folder = _free_name(parent, f"{time.strftime('%Y-%m-%d')}_{recipe.name}")
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=parent))
    try:
        shutil.copyfile(script, build / "train_gpt.py")
        for seed in seeds:
            shutil.copyfile(staging / f"train_seed{seed}.log", build / f"train_seed{seed}.log")
        write_json_atomic(build / "submission.json", summary)
        atomic_write(build / "README.md", _readme(recipe, summary, hardware, script.read_text(),
                                                        launch_command(data_dir, tokenizer, nproc, device)).encode())
        from pipeline.plots import plot_records

        plot_records(logs, build)
        build.chmod(0o755)
        os.rename(build, folder)  # the folder appears complete or not at all
    finally:
        if build.exists():
            shutil.rmtree(build)
    echo(f"submission val_bpb_mean={summary['val_bpb']:.8f} std={fixed8(summary['val_bpb_std'])} "
         f"bytes_total_max={summary['bytes_total']} track={summary['track']} hardware={hardware}")
    return folder
