"""The pipeline's stages, one module each, run in order by the CLI.

Among them, the export path that turns a trained state_dict into a scored, size-checked
artifact:

- `quantize`: resolve the recipe's quant rules into a per-tensor plan and quantize.
- `package`: write the compressed blob (`model.bin`), its sha256 and the byte accounting;
  also `predict_bytes`, a dry-run size estimate that needs no trained weights.
- `roundtrip`: read the blob back from disk and strict-load it into a fresh model, so the
  reported score is always the score of the artifact.

The reading/dequantizing math they share lives in `pipeline.quant`, which is runtime-pure
(stdlib, torch, numpy, zstandard only) so it can be bundled into the submission script.
"""
