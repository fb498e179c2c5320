"""The export stage's machinery: trained weights -> quantized, compressed artifact -> read back.

- `codec`: scheme math (int5..int8 per row, SD-clip, fp16 / fp32, raw), the zstd / zlib codecs and
  the pickle-free container reader (`decode_artifact`). Runtime-pure: the submission script bundles it.
- `gptq`, `lqer`, `packagers`: full-Hessian GPTQ schemes and their calibrate hook, LQER low-rank
  error repair, the brotli / byte-shuffle / per-group lrzip compressors; runtime modules the codec
  imports by name, shipped only to recipes that use them.
- `calibration`: runs calibrating schemes' hooks at the end of training, inside its budget.
- `plan`: the recipe's quant rules resolved into a per-tensor plan; `quantize_state_dict`.
- `artifact`: write the blob (atomic, sha256 beside it), byte accounting and the cap gate, and read
  it back from disk with every integrity check (`load_artifact`, `roundtrip_into`).
- `predict`: a dry-run size estimate from shapes alone (`pgolf check`).

The stage itself (quantize, pack, read back) is `pipeline.stages.export`.
"""
