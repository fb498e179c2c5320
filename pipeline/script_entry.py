"""The entry point of the generated, shipped `train_gpt.py` (see pipeline.codegen).

It runs the same list of stages as `pgolf run` (pipeline.stages.sequence.STAGES) without caching
or checkpoints: train (+EMA) -> export (quantize, pack, read back) -> score (sliding window,
score-first TTT) -> report. Every figure it prints is what `pgolf submit` puts in submission.json.
Settings come from the embedded recipe; paths and the seed from the environment, as the challenge's
scripts do:

    DATA_PATH       shards (default ./data/datasets/fineweb10B_sp<vocab>)
    TOKENIZER_PATH  the .model (default DATA_PATH/tokenizer.model if present, else the
                    challenge's ./data/tokenizers/fineweb_<vocab>_bpe.model)
    SEED            overrides the recipe's seed
    RUN_ID          a label for the log's first line
    OUT_DIR         where the weights, the blob and report.json go (default .)
    PGOLF_DEVICE    auto | cpu | cuda (default auto)

Runs with nothing but torch, numpy, sentencepiece and zstandard installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

from pipeline import distributed
from pipeline.config import Recipe, from_dict
from pipeline.data.identity import check_meta, published_export_problem
from pipeline.data.shards import list_shards, read_header
from pipeline.errors import UserError
from pipeline.fileio import file_sha256
from pipeline.stages import evaluate as ev
from pipeline.stages.base import Context, Logger, run_stages
from pipeline.stages.report import legality_tag
from pipeline.stages.sequence import STAGES

# Where each stage's files go in the flat output folder (the challenge's scripts write final_model.*).
FILE_NAMES = {("train", "weights.pt"): "final_model.pt", ("export", "model.bin"): "final_model.bin",
              ("report", "report.json"): "report.json"}


def run_script(recipe: Recipe, script_path: str, data_dir: Path, tokenizer_path, out_dir: Path,
               run_id: str = "", device: str = "auto") -> dict:
    info = distributed.init(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(lambda line: print(line, flush=True), legality_tag(recipe), enabled=info.is_main)
    log(f"pgolf train_gpt.py recipe={recipe.name} seed={recipe.seed} run_id={run_id or '-'} "
        f"world_size={info.world_size} device={info.device}")
    tok = Path(tokenizer_path) if tokenizer_path else default_tokenizer(data_dir, recipe.model.vocab_size)
    data = ev.load_data(data_dir, recipe, tok)
    val_paths = list_shards(data_dir, "val")
    check_meta(data_dir, tok, data.train_shards, val_paths)
    tok_sha = file_sha256(tok)
    problem = published_export_problem(data.train_shards, tok_sha, sum(read_header(p) for p in val_paths),
                                       recipe.eval.seq_len)
    if problem:
        log(f"warning: {problem}")
    log(f"train_shards={len(data.train_shards)} val_tokens={data.val_tokens.size}")
    ctx = Context(recipe=recipe, dist=info, data=data, log=log, code_bytes=os.path.getsize(script_path),
                  path=lambda stage, name: out_dir / FILE_NAMES.get((stage, name), f"{stage}_{name}"),
                  provenance={"script_sha256": file_sha256(script_path), "tokenizer_sha256": tok_sha})
    return run_stages(STAGES, ctx)["report"]


def default_tokenizer(data_dir: Path, vocab_size: int) -> Path:
    """The tokenizer beside the shards (pgolf's layout), else where the challenge keeps it."""
    beside = Path(data_dir) / "tokenizer.model"
    return beside if beside.exists() else Path(f"./data/tokenizers/fineweb_{vocab_size}_bpe.model")


def env_seed(text: str) -> int:
    """SEED from the environment, held to the recipe's own bounds for `seed` (dataclasses.replace
    would skip them). Raises UserError naming the value and the range."""
    rules = next(f.metadata["constraints"] for f in fields(Recipe) if f.name == "seed")
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not rules["ge"] <= seed <= rules["le"]:
        raise UserError(f"SEED={text!r} is not a seed; give a whole number from {rules['ge']} to {rules['le']}.")
    return seed


def main(recipe_json: str, script_path: str) -> None:
    recipe = from_dict(Recipe, json.loads(recipe_json))
    try:
        if os.environ.get("SEED"):
            recipe = replace(recipe, seed=env_seed(os.environ["SEED"]))
        data_dir = Path(os.environ.get("DATA_PATH", f"./data/datasets/fineweb10B_sp{recipe.model.vocab_size}"))
        run_script(recipe, script_path, data_dir, os.environ.get("TOKENIZER_PATH") or None,
                   Path(os.environ.get("OUT_DIR", ".")), os.environ.get("RUN_ID", ""),
                   os.environ.get("PGOLF_DEVICE", "auto"))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
