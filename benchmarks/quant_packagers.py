"""GPTQ vs per-row int6, LQER's gain per byte, and the compressors on one blob (issue 13 items 3-4).

Trains the `tiny` recipe (4 layers x 128, sp1024) for --steps steps on CPU on tinyshakespeare (the
shared folder's copy, else the embedded corpus), with GPTQ's calibrate hook collecting the input
Hessians of every linear map from --calibration-batches training micro-batches inside the training
stage (as a gptq recipe does). Then, on those same exported weights and Hessians, it writes one
artifact per quantization variant to disk, reads it back (pipeline.export.artifact.load_artifact)
and scores the model read back on the first --val-tokens validation tokens (sliding windows,
stride 64, as the recipe's eval), and prints:

1. RTN vs GPTQ at the same bit width and the same container layout: every matrix (attention, MLP)
   int6 per row, by round-to-nearest (`int6`) or GPTQ (`gptq6`), with the row-max scale and with
   SD-clip k in --clip-sigmas (PR #1394's default is 12.85); the tied embedding int8 in all (so only
   the matrices differ). Bytes (zstd-22 blob), val_loss / val_bpb and the gap to the unquantized
   weights (`prequant`); then, since k trades bytes for error, each GPTQ point against RTN's val_bpb
   interpolated to the same bytes.
2. LQER on the GPTQ SD-clip plan of --lqer-base-clip (the record repairs SD-clipped GPTQ): rank 4
   on the top-k tensors for k in --lqer-k; the loss gain, the bytes added, the gain per added KB,
   beside what a KB buys along the GPTQ clip sweep.
3. The GPTQ row-max and SD-clip blobs under zstd-22, zlib-9, brotli-11, brotli_shuffle-11 and, where
   the lrzip program is installed, pergroup (lrzip -z -L 9 -T per tensor group + brotli): bytes and
   seconds to compress, each checked to decompress to the same container.

    .venv/bin/python benchmarks/quant_packagers.py [--steps 200] [--work artifacts/bench_quant]

Trained weights are cached in the work folder by pgolf's stage cache (a rerun only re-quantizes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MATRICES = r"\.(attn|mlp)\."


def prepare(work: Path) -> Path:
    from pipeline.data.corpus import embedded_data
    from pipeline.data.prepare import prepare_text

    if not TEXT.exists():
        return embedded_data(work / "cache")
    out = work / "data"
    if not (out / "meta.json").exists():
        prepare_text(TEXT, out, vocab_size=1024)
    return out


def train(work: Path, data: Path, steps: int, calibration_batches: int, val_tokens: int):
    """The tiny recipe trained with a gptq6 rule, so the train stage calibrates (Hessians)."""
    from pipeline.distributed import init
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    rules = (f"quant.rules=[{{scheme: fp32, roles: [control, gate]}}, {{scheme: gptq6, pattern: '{MATRICES}'}}, "
             "{scheme: int8}]")
    recipe = load_recipe("tiny", [f"train.max_steps={steps}", f"train.warmdown_steps={steps // 2}",
                                  "train.max_wallclock_s=0", "ttt.enabled=false", f"data.max_val_tokens={val_tokens}",
                                  rules, f"quant.calibration_batches={calibration_batches}"])
    report = run_recipe(recipe, data, work / "runs", init("cpu"), echo=lambda line: None, code_bytes=0)
    (run,) = list((work / "runs").glob(f"tiny/*/seed{recipe.seed}"))
    weights = torch.load(run / "train" / "weights.pt", map_location="cpu", weights_only=True)
    hessians = torch.load(run / "train" / "calibration.pt", map_location="cpu", weights_only=True)["gptq6"]
    return recipe, report, weights, hessians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--val-tokens", type=int, default=65536)
    ap.add_argument("--lqer-k", default="1,3,6,12")
    ap.add_argument("--clip-sigmas", default="16,12.85,10,8", help="SD-clip k of the RTN/GPTQ sweep")
    ap.add_argument("--lqer-base-clip", default="12.85", help="the sweep's k whose GPTQ plan LQER repairs")
    ap.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench_quant")
    args = ap.parse_args()

    from eval.scorer import evaluate
    from pipeline.config import LqerConfig, PackageConfig, QuantConfig, QuantRule
    from pipeline.export.artifact import load_artifact, package_model, serialize
    from pipeline.export.codec import compress, decompress
    from pipeline.export.plan import quantize_state_dict
    from pipeline.model import build_model
    from pipeline.model.roles import tensor_roles
    from pipeline.stages.evaluate import load_data

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data_dir = prepare(work)
    t0 = time.perf_counter()
    recipe, report, weights, hessians = train(work, data_dir, args.steps, args.calibration_batches, args.val_tokens)
    print(f"trained tiny: steps={report['steps']} params={report['params']} calibration_batches="
          f"{args.calibration_batches} hessians={len(hessians)} ({time.perf_counter() - t0:.0f} s incl. cache)")
    data = load_data(data_dir, recipe)
    roles = tensor_roles(recipe.model)
    calibration = {f"gptq{b}": hessians for b in (5, 6, 7, 8)}  # one hook: the same Hessians for each
    blobs = work / "blobs"
    blobs.mkdir(exist_ok=True)

    def score(state) -> tuple[float, float]:
        model = build_model(recipe.model)
        model.load_state_dict(state, strict=True)
        res = evaluate(model, data.val_tokens, data.tables, recipe.eval, torch.device("cpu"))
        return res.val_loss, res.val_bpb

    def variant(name: str, quant: QuantConfig, cfg: PackageConfig = PackageConfig()):
        """Quantize, write the blob, read it back from disk, score it."""
        q = quantize_state_dict(weights, quant, roles=roles, calibration=calibration)
        out = package_model(q, blobs / f"{name}.bin", cfg, 0, meta={"bench": name}, group_report=False)
        state, _ = load_artifact(blobs / f"{name}.bin", out["sha256"])
        loss, bpb = score(state)
        return q, out, loss, bpb

    def rules(matrix_scheme: str, **clip) -> tuple[QuantRule, ...]:
        return (QuantRule(scheme="fp32", roles=("control", "gate")),
                QuantRule(scheme=matrix_scheme, pattern=MATRICES, **clip), QuantRule(scheme="int8"))

    pre_loss, pre_bpb = score(weights)
    n_int6 = sum(t.numel() for n, t in weights.items() if (".attn." in n or ".mlp." in n) and t.dim() == 2)
    print(f"\n1. matrices int6 per row ({n_int6} weights), tied embedding int8; blob zstd-22, read back from disk")
    print(f"   {'variant':<26} {'bytes_model':>11} {'val_loss':>9} {'val_bpb':>9} {'gap_bpb':>8}")
    print(f"   {'prequant (fp32 weights)':<26} {'':>11} {pre_loss:9.5f} {pre_bpb:9.5f} {'':>8}")
    results: dict[tuple[str, float | None], tuple] = {}
    for k in [None, *(float(x) for x in args.clip_sigmas.split(","))]:
        for scheme in ("int6", "gptq6"):
            clip = {} if k is None else {"clip_sigmas": k}
            label = f"{scheme} {'row max' if k is None else f'SD-clip {k:g}'}"
            q, out, loss, bpb = variant(label.replace(" ", "_"), QuantConfig(rules=rules(scheme, **clip)))
            results[(scheme, k)] = (q, out, loss, bpb)
            print(f"   {label:<26} {out['bytes_model']:>11} {loss:9.5f} {bpb:9.5f} {bpb - pre_bpb:+8.5f}")
    # At equal bytes: RTN's val_bpb interpolated (linearly in bytes) between the two RTN points that
    # bracket each GPTQ point's bytes; the clip k is the size knob (pg_mechanics.md §4.1.4).
    rtn = sorted((r[1]["bytes_model"], r[3]) for (s_, _k), r in results.items() if s_ == "int6")
    print("   at equal bytes (RTN interpolated between its two neighbouring clips):")
    for (scheme, k), (_q, out, _loss, bpb) in results.items():
        if scheme != "gptq6":
            continue
        b = out["bytes_model"]
        pairs = [(lo, hi) for lo, hi in zip(rtn, rtn[1:]) if lo[0] <= b <= hi[0]]
        if not pairs:
            print(f"   gptq6 {'row max' if k is None else f'SD-clip {k:g}'}: {b} bytes, outside the RTN sweep")
            continue
        (b0, v0), (b1, v1) = pairs[0]
        at = v0 + (v1 - v0) * (b - b0) / (b1 - b0) if b1 != b0 else v0
        print(f"   gptq6 {'row max' if k is None else f'SD-clip {k:g}':<15} {b:>8} bytes: val_bpb {bpb:.5f} vs "
              f"int6 RTN {at:.5f} ({bpb - at:+.5f}; gap {bpb - pre_bpb:+.5f} vs {at - pre_bpb:+.5f})")

    lq_k = float(args.lqer_base_clip)
    base_q, base_out, base_loss, base_bpb = results[("gptq6", lq_k)]
    print(f"\n2. LQER rank 4 (A int2, B int4 / 64) on the gptq6 SD-clip {lq_k:g} plan "
          f"({base_out['bytes_model']} bytes, val_bpb {base_bpb:.5f}): top-k tensors by ||W - W_hat||_F")
    print(f"   {'top_k':>5} {'bytes_model':>11} {'+bytes':>7} {'val_bpb':>9} {'gain_bpb':>9} {'bpb per KB':>10}"
          "  repaired")
    for k in (int(x) for x in args.lqer_k.split(",")):
        q, out, loss, bpb = variant(f"lqer_k{k}", QuantConfig(rules=rules("gptq6", clip_sigmas=lq_k),
                                                             lqer=LqerConfig(rank=4, top_k=k)))
        added = out["bytes_model"] - base_out["bytes_model"]
        fixed = [n for n, m in q.manifest.items() if "+lqer" in m["scheme"]]
        per_kb = (base_bpb - bpb) / (added / 1000) if added > 0 else float("nan")
        print(f"   {k:>5} {out['bytes_model']:>11} {added:>+7d} {bpb:9.5f} {base_bpb - bpb:+9.5f} {per_kb:10.6f}  "
              f"{', '.join(fixed[:3])}{' ...' if len(fixed) > 3 else ''}")
    # the same bytes spent on a wider clip instead, for scale: d(val_bpb)/d(bytes) along the GPTQ sweep
    sweep = sorted((r[1]["bytes_model"], r[3]) for (s_, _k), r in results.items() if s_ == "gptq6")
    for (b0, v0), (b1, v1) in zip(sweep, sweep[1:]):
        print(f"   (gptq6 clip sweep {b0} -> {b1} bytes: {(v0 - v1) / ((b1 - b0) / 1000):.6f} bpb per KB)")

    print("\n3. one blob's container under each compressor (same bytes in, checked on the way out)")
    codecs = [("zstd", 22), ("zlib", 9), ("brotli", 11), ("brotli_shuffle", 11)]
    if shutil.which("lrzip"):
        codecs.append(("pergroup", 9))
    else:
        print("   pergroup: skipped, the lrzip program is not installed (apt-get install lrzip)")
    for key in (("gptq6", None), ("gptq6", lq_k)):
        raw = serialize(results[key][0], {"bench": "compressors"})
        print(f"   {key[0]} {'row max' if key[1] is None else f'SD-clip {key[1]:g}'}: raw container {len(raw)} bytes")
        print(f"   {'compressor':<18} {'bytes':>9} {'vs zstd-22':>10} {'compress_s':>10}")
        zstd_bytes = None
        for name, level in codecs:
            t0 = time.perf_counter()
            blob = compress(raw, name, level)
            secs = time.perf_counter() - t0
            assert decompress(blob) == raw, name
            zstd_bytes = zstd_bytes or len(blob)
            print(f"   {f'{name}-{level}':<18} {len(blob):>9} {len(blob) - zstd_bytes:>+10d} {secs:10.2f}")


if __name__ == "__main__":
    main()
