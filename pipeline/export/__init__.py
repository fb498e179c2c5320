"""The export stage's machinery: trained weights -> quantized, compressed artifact -> read back.

- `codec`: scheme math (int6 / int8 per row, fp16 / fp32, raw), the zstd / zlib codecs and the
  pickle-free container reader (`decode_artifact`). Runtime-pure: the submission script bundles it.
- `plan`: the recipe's quant rules resolved into a per-tensor plan; `quantize_state_dict`.
- `artifact`: write the blob (atomic, sha256 beside it), byte accounting and the cap gate, and read
  it back from disk with every integrity check (`load_artifact`, `roundtrip_into`).
- `predict`: a dry-run size estimate from shapes alone (`pgolf check`).

The stage itself (quantize, pack, read back) is `pipeline.stages.export`.
"""
