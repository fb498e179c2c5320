#!/usr/bin/env bash
# The GPU checks of issue 11, on one offline CUDA machine, from the source tree, in under 8 minutes:
#
#   1. pytest -m gpu                                  the CUDA fast-path tests (tests/test_fast_path.py)
#   2. pgolf bench sidecar48 at full size             one GPU, gradient accumulation 8: the 8-GPU step
#   3. PR #684's own train_gpt.py, same shards        if it runs on this machine's packages
#   4. pgolf bench of the eval pass                   sliding window, stride 64, context 2,048
#
# Each part has its own time limit (120 + 150 + 130 + 45 s), so the whole stays under 8 minutes.
#
# then a short table. Logs and the table go to $OUT (default: a new temporary folder).
#
#   bash benchmarks/gpu_check.sh
#   STEPS=2 EXTRA_SETS="--set model.num_layers=2 ..." bash benchmarks/gpu_check.sh   # a dry run of the flow
#
# The machine may lack pgolf's pure-Python dependencies and have no network: wheels in
# $PGOLF_WHEELS (default .cache/gpu_check/wheels) are installed with pip --no-index when a module is
# missing. PR #684's script is read from $PR684_TRAIN_GPT (default .cache/gpu_check/pr684_train_gpt.py)
# and the sp1024 tokenizer it needs from $TOKENIZER_PATH (default .cache/gpu_check/fineweb_1024_bpe.model,
# else ../shared/data/tokenizers/fineweb_1024_bpe.model). benchmarks/gpu_check_prepare.sh fills
# .cache/gpu_check on a machine with the package index and a clone of openai/parameter-golf; the
# folder is git-ignored: PR #684's code is never part of this project. Without the script or the
# tokenizer, part 3 is skipped with a message saying which is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
case "$PY" in */*) PY=$(realpath "$PY") ;; esac   # part 3 runs from another folder
OUT=${OUT:-$(mktemp -d -t pgolf_gpu_check.XXXXXX)}
mkdir -p "$OUT"
CACHE=.cache/gpu_check
WHEELS=${PGOLF_WHEELS:-$CACHE/wheels}
PR684=${PR684_TRAIN_GPT:-$CACHE/pr684_train_gpt.py}
TOK=${TOKENIZER_PATH:-$CACHE/fineweb_1024_bpe.model}
[ -f "$TOK" ] || TOK=../shared/data/tokenizers/fineweb_1024_bpe.model
STEPS=${STEPS:-10}
read -r -a EXTRA <<< "${EXTRA_SETS:-}"   # extra pgolf --set arguments (parts 2 and 4)
START=$(date +%s)
declare -A RESULT

note() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }
val() { grep -o "$1=[^ ]*" "$2" | tail -1 | cut -d= -f2; }   # value of key=... in a log

# ---- 0. environment: the missing pure-Python dependencies, from local wheels only
"$PY" - <<'EOF' > "$OUT/env.txt" 2>&1
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
cat "$OUT/env.txt" | tee -a "$OUT/gpu_check.log"
missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"zstandard": "zstandard", "pydantic": "pydantic", "python_minifier": "python-minifier", "brotli": "brotli",
        "hypothesis": "hypothesis", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -d "$WHEELS" ]; then
    note "installing from $WHEELS: $missing"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing >> "$OUT/pip.log" 2>&1 \
      || note "pip could not install all of: $missing (see $OUT/pip.log)"
  else
    note "missing modules ($missing) and no wheel folder $WHEELS: run benchmarks/gpu_check_prepare.sh where the index is reachable"
  fi
fi

# ---- 1. the GPU tests
note "1/4 pytest -m gpu"
timeout 120 "$PY" -m pytest -q -m gpu tests > "$OUT/pytest_gpu.log" 2>&1
rc=$?
RESULT[pytest]="$(tail -1 "$OUT/pytest_gpu.log") (exit $rc)"

# ---- 2. pgolf bench sidecar48, full size, one GPU (accumulation 8 = the 8-GPU step)
note "2/4 pgolf bench sidecar48 --steps $STEPS"
rm -rf "$OUT/shards"
timeout 150 "$PY" -m pipeline bench sidecar48 --steps "$STEPS" --warmup 3 --eval-tokens 65536 \
  --data-dir "$OUT/shards" "${EXTRA[@]}" > "$OUT/bench_sidecar48.log" 2>&1
rc=$?
B="$OUT/bench_sidecar48.log"
RESULT[pgolf]="exit $rc step_ms=$(val step_ms_median "$B") tok_s=$(val tokens_per_s "$B") mfu=$(val mfu "$B") peak_mem=$(val peak_mem_bytes "$B") compile_warmup_s=$(val compile_warmup_s "$B")"

# ---- 3. PR #684's train_gpt.py on the same synthetic shards (its own 8-way accumulation)
note "3/4 PR #684 train_gpt.py"
if [ ! -f "$PR684" ]; then
  RESULT[pr684]="skipped: no $PR684 (set PR684_TRAIN_GPT, or run benchmarks/gpu_check_prepare.sh)"
elif [ ! -f "$TOK" ]; then
  RESULT[pr684]="skipped: no sp1024 tokenizer at $TOK (set TOKENIZER_PATH)"
elif [ ! -d "$OUT/shards" ]; then
  RESULT[pr684]="skipped: part 2 wrote no shards"
else
  mkdir -p "$OUT/pr684"
  ITER=$((STEPS + 3))
  SCRIPT=$(realpath "$PR684") TOKABS=$(realpath "$TOK")
  # its code defaults are the logged #684 run; these only shorten it and switch off eval and TTT
  ( cd "$OUT/pr684" && DATA_PATH="$OUT/shards" TOKENIZER_PATH="$TOKABS" RUN_ID=gpu_check SEED=1337 \
      LOG_DIR="$OUT/pr684" ITERATIONS=$ITER WARMUP_STEPS=3 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 \
      TRAIN_LOG_EVERY=1 VAL_TOKEN_LIMIT=65536 FINAL_EVAL_ENABLE=0 FINAL_SLIDING_EVAL_ENABLE=0 TTT_ENABLED=0 \
      timeout 130 "$PY" "$SCRIPT" ) > "$OUT/pr684.log" 2>&1
  rc=$?
  last=$(grep -o "step:$ITER/$ITER train_loss:[^ ]* train_time:[^ ]* step_avg:[^ ]*" "$OUT/pr684.log" | tail -1)
  first=$(grep -o "step:3/$ITER train_loss:[^ ]* train_time:[0-9]*ms" "$OUT/pr684.log" | tail -1)
  if [ -n "$last" ]; then
    # steps 4..ITER only (its step_avg also counts the first steps after compile priming)
    t_last=$(echo "$last" | sed 's/.*train_time:\([0-9]*\)ms.*/\1/'); t3=$(echo "$first" | sed 's/.*train_time:\([0-9]*\)ms/\1/')
    RESULT[pr684]="exit $rc $last step_ms_after_3=$(( (t_last - ${t3:-0}) / (ITER - 3) )) $(grep -o 'peak memory allocated: [0-9]* MiB' "$OUT/pr684.log")"
  else
    RESULT[pr684]="did not run here (exit $rc): $(grep -E 'Error|error' "$OUT/pr684.log" | tail -1 | cut -c1-160)"
  fi
fi

# ---- 4. the eval pass alone: sliding window, stride 64, context 2,048
note "4/4 pgolf bench eval pass"
timeout 45 "$PY" -m pipeline bench sidecar48 --steps 0 --warmup 0 --set eval.stride=64 --set eval.seq_len=2048 \
  --eval-tokens "${EVAL_TOKENS:-1048576}" "${EXTRA[@]}" > "$OUT/bench_eval.log" 2>&1
rc=$?
E="$OUT/bench_eval.log"
RESULT[eval]="exit $rc eval_tokens=$(val eval_tokens "$E") eval_s=$(val eval_s "$E") eval_tokens_per_s=$(val eval_tokens_per_s "$E")"

{
  echo
  echo "gpu_check ($(cat "$OUT/env.txt")), $(( $(date +%s) - START ))s"
  printf '%-8s %s\n' pytest "${RESULT[pytest]}" pgolf "${RESULT[pgolf]}" pr684 "${RESULT[pr684]}" eval "${RESULT[eval]}"
} | tee "$OUT/table.txt"
