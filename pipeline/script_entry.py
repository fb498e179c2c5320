"""The entry point of the generated `train_gpt.py` (see pipeline.codegen).

Runs the whole pipeline from an embedded, already-validated recipe with nothing but torch,
numpy, sentencepiece and zstandard: train (+EMA) -> quantize -> compress -> write the blob ->
read it back -> score (sliding window, optional score-first TTT). Settings come from the
recipe; only paths and the seed come from the environment, as the challenge's scripts do:
DATA_PATH (shards), TOKENIZER_PATH (.model; default DATA_PATH/tokenizer.model), SEED, OUT_DIR.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from pipeline import distributed
from pipeline.config import Recipe, from_dict
from pipeline.errors import SizeCapError, UserError
from pipeline.fileio import atomic_write
from pipeline.model import build_model
from pipeline.quant import build_metadata, compress, decode_artifact, encode_container
from pipeline.stages import evaluate as ev
from pipeline.stages.quantize import quantize_state_dict
from pipeline.stages.train import train


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


def run_submission(recipe: Recipe, script_path: str, data_dir: Path, tokenizer_path, out_dir: Path) -> dict:
    info = distributed.init("auto")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"train_seed{recipe.seed}.log"

    def log(line: str) -> None:
        if info.is_main:
            print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(line + "\n")

    log(f"pgolf submission recipe={recipe.name} seed={recipe.seed} world_size={info.world_size} device={info.device}")
    data = ev.load_data(data_dir, recipe, tokenizer_path)
    log(f"train_shards={len(data.train_shards)} val_tokens={data.val_tokens.size}")
    result, model = train(recipe, data.train_shards, out_dir / f"checkpoint_seed{recipe.seed}", info, log=log)
    log(f"train_done steps={result.steps} train_time={result.train_time_s:.1f}s")

    qmodel = quantize_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, recipe.quant.rules)
    raw = encode_container(qmodel.tensors, build_metadata(qmodel.manifest, {"recipe": recipe.name,
                                                                          "seed": recipe.seed}))
    blob = compress(raw, recipe.package.compressor, recipe.package.level)
    blob_path = out_dir / "final_model.bin"
    code_bytes = os.path.getsize(script_path)
    total = len(blob) + code_bytes
    if info.is_main:
        atomic_write(blob_path, blob)
    _barrier(info.world_size)
    label = f"pgolf+{recipe.package.compressor}-{recipe.package.level}"
    log(f"Serialized model {label}: {len(blob)} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size {label}: {total} bytes")
    if total > recipe.package.cap_bytes:
        raise SizeCapError(f"artifact {total} bytes exceeds the cap {recipe.package.cap_bytes}")

    # Every score below comes from the blob read back from disk.
    state, _header = decode_artifact(blob_path.read_bytes())
    fresh = build_model(recipe.model).to(info.device)
    fresh.load_state_dict(state, strict=True)
    t0 = time.perf_counter()
    scores = {"roundtrip": ev.score(fresh, data, recipe, info, log, label="final_roundtrip")}
    if recipe.ttt.enabled:
        scores["ttt"] = ev.score_ttt(fresh, data, recipe, info, log)
    final = scores.get("ttt") or scores["roundtrip"]
    log(f"final_exact val_loss={final['val_loss']:.8f} val_bpb={final['val_bpb']:.8f} bytes_total={total} "
        f"eval_time={time.perf_counter() - t0:.1f}s")
    return {"val_bpb": final["val_bpb"], "val_loss": final["val_loss"], "bytes_total": total,
            "bytes_model": len(blob), "bytes_code": code_bytes, "steps": result.steps}


def main(recipe_json: str, script_path: str) -> None:
    recipe = from_dict(Recipe, json.loads(recipe_json))
    if os.environ.get("SEED"):
        recipe = replace(recipe, seed=int(os.environ["SEED"]))
    data_dir = Path(os.environ.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024"))
    tok = os.environ.get("TOKENIZER_PATH") or None
    try:
        run_submission(recipe, script_path, data_dir, tok, Path(os.environ.get("OUT_DIR", ".")))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
