"""Roundtrip stage: read the artifact back from disk and load it into a fresh model.

The reported score must be the score of the bytes that ship, never of the in-memory
weights (baseline rule, pg_mechanics.md §3.7; PR #298 logged a "roundtrip" number without
evaluating the dequantized model, seed_prs.md §2.3). So this stage starts from the file:

    state_dict, meta = load_artifact("runs/x/model.bin", expected_sha256=result["sha256"])
    model = roundtrip_into(lambda: build_model(recipe.model), "runs/x/model.bin", sha)

Checks, each a UserError naming the file and the fix: the file exists; its sha256 matches
(the expected value given, else the `model.bin.sha256` written beside it, if present); the
compressed frame is complete; the container header is valid and of a known format version;
the state_dict fits the freshly built model exactly (strict load: no missing or unexpected
keys, no shape mismatch). Decoding itself is `pipeline.quant.decode_artifact`, the same
code the submission script runs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch

from pipeline.errors import UserError
from pipeline.quant import ArtifactError, decode_artifact


def _sidecar_sha(blob_path: str) -> str | None:
    side = blob_path + ".sha256"
    if not os.path.exists(side):
        return None
    with open(side, encoding="utf-8") as f:
        text = f.read().split()
    return text[0].lower() if text else None


def load_artifact(blob_path: str, expected_sha256: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read, verify and decode `blob_path`. Returns (state_dict, meta), where meta is the
    recipe/model identity given to package_model (the per-tensor manifest is available
    from `pipeline.quant.decode_artifact` for callers that want it)."""
    if not os.path.isfile(blob_path):
        raise UserError(f"artifact {blob_path} does not exist; run `pgolf package` first")
    with open(blob_path, "rb") as f:
        blob = f.read()
    expected = expected_sha256 or _sidecar_sha(blob_path)
    if expected:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected.strip().lower():
            raise UserError(f"artifact {blob_path} checksum mismatch (sha256 {actual}, "
                            f"expected {expected}): the blob is corrupted; re-run "
                            "`pgolf package`")
    try:
        state_dict, header = decode_artifact(blob)
    except ArtifactError as e:
        raise UserError(f"artifact {blob_path}: {e}") from None
    return state_dict, dict(header.get("meta") or {})


def roundtrip_into(model_factory: Callable[[], torch.nn.Module], blob_path: str,
                   expected_sha256: str | None = None) -> torch.nn.Module:
    """Build a fresh model and strict-load the artifact's weights into it."""
    state_dict, _ = load_artifact(blob_path, expected_sha256)
    model = model_factory()
    expected_keys = set(model.state_dict().keys())
    missing = sorted(expected_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        raise UserError(f"artifact {blob_path} does not fit the model built from the recipe: "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                        f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; package it "
                        "from this recipe, or roundtrip with the recipe it was packaged from")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatch: the message lists the offending tensors
        raise UserError(f"artifact {blob_path} does not fit the model built from the recipe "
                        f"({str(e).splitlines()[-1].strip()}); package it from this recipe, "
                        "or roundtrip with the recipe it was packaged from") from None
    return model
