#!/usr/bin/env bash
# Fill .cache/gpu_check (git-ignored) with what benchmarks/gpu_check.sh needs on an offline GPU
# machine; run it here, where the package index is reachable:
#
#   PARAMETER_GOLF_GIT=<clone of openai/parameter-golf with refs/pull/684/head fetched> \
#   GPU_PYTHON_VERSIONS="3.10 3.11 3.12" bash benchmarks/gpu_check_prepare.sh
#
# - wheels/: pgolf's dependencies a bare CUDA image lacks (zstandard, pydantic, python-minifier, brotli,
#   hypothesis, pytest and what they pull in, pytest's exceptiongroup/tomli for Python 3.10), for each
#   Python version the GPU machine might run,
# - pr684_train_gpt.py: PR #684's own script (`git show refs/pull/684/head:<record>/train_gpt.py`),
#   which stays outside the project's tracked files,
# - fineweb_1024_bpe.model: the challenge's sp1024 tokenizer from ../shared.
# The folder travels to the GPU machine with the working tree as an ignored path.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/gpu_check
mkdir -p "$DEST/wheels"
PY=${PYTHON:-.venv/bin/python}
for v in ${GPU_PYTHON_VERSIONS:-3.10 3.11 3.12}; do
  "$PY" -m pip download -q --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST/wheels" \
    zstandard pydantic python-minifier brotli hypothesis pytest exceptiongroup tomli
done
RECORD=records/track_10min_16mb/2026-03-25_Sidecar48_Enhanced_Attention_Async_Data_Pipeline_AdamW_TTT/train_gpt.py
if [ -n "${PARAMETER_GOLF_GIT:-}" ]; then
  git -C "$PARAMETER_GOLF_GIT" show "refs/pull/684/head:$RECORD" > "$DEST/pr684_train_gpt.py"
else
  echo "PARAMETER_GOLF_GIT not set: no pr684_train_gpt.py (gpu_check.sh then skips PR #684)"
fi
cp ../shared/data/tokenizers/fineweb_1024_bpe.model "$DEST/"
du -sh "$DEST"
