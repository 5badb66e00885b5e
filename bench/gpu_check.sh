#!/usr/bin/env bash
# The issue-22 points a lent GPU can show, as one command with a hard wall-clock cap; prints a markdown report.
#
#   bash bench/gpu_check.sh                 on a CUDA machine (8 minutes at most, GPU_CHECK_SECONDS=480)
#   bash bench/gpu_check.sh --dry-run       the same Python on this CPU at toy sizes (also: --cpu), about a minute
#
# Installs nothing beyond `bash scripts/setup.sh --dev` when .venv is missing. Builds random models in the real
# layouts (no real weights needed), then runs each stage of bench/gpu_check.py in its own process under `timeout`:
# the published-width DiT forward per attention backend at 31 and 163 frames (1 and 2 blocks, extrapolated to 48,
# TFLOP/s, peak memory, beside bench/estimate_h100.py), the published VAE decoding 163 frames (streaming, tiled),
# the memory modes (resident, model, sequential: peak device memory while loading and sampling, s/step, bytes moved,
# attention backend), noise from a CUDA generator, a decode forced out of memory with
# torch.cuda.set_per_process_memory_fraction (recovered, or the latents written and decoded by --decode_latents),
# VAE torch.compile recompilations, and bench/bench_offload.py when present. The whole run stops at the cap: a stage
# that would not finish in the time left is skipped, and the report says so. The report is also written to
# $OUT/gpu_check.md when $OUT is set (the device machine's return folder), and to the work folder.
# Environment: GPU_CHECK_SECONDS (the cap), GPU_CHECK_WORK (the work folder; default a new temporary one),
# GPU_CHECK_SKIP_OFFLOAD=1 (leave bench_offload.py out; the dry-run test does).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
CPU=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu) CPU=1 ;;
    *) echo "gpu_check.sh: unknown option $arg (valid: --dry-run, --cpu)" >&2; exit 2 ;;
  esac
done
if [ "$CPU" = 1 ]; then TOTAL=${GPU_CHECK_SECONDS:-600}; else TOTAL=${GPU_CHECK_SECONDS:-480}; fi
RESERVE=15  # seconds kept for the report

left() { echo $((TOTAL - ($(date +%s) - START) - RESERVE)); }

if [ ! -x .venv/bin/python ]; then
  echo "gpu_check: .venv is missing; running scripts/setup.sh --dev" >&2
  timeout -k 5 "$(left)" bash scripts/setup.sh --dev || { echo "gpu_check: setup failed" >&2; exit 1; }
fi
PY=.venv/bin/python
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mochi_gpu_check.XXXXXX")}
mkdir -p "$WORK"
: > "$WORK/results.jsonl"
FLAGS=(--work "$WORK")
[ "$CPU" = 1 ] && FLAGS+=(--cpu)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# stage NAME CAP_SECONDS ARGS...: one process, at most CAP seconds and never past the overall cap.
stage() {
  local name=$1 cap=$2 budget rc before
  shift 2
  budget=$(left)
  if [ "$budget" -lt 10 ]; then
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"skipped: the ${TOTAL} s cap was reached\"}" >> "$WORK/results.jsonl"
    return
  fi
  [ "$cap" -gt "$budget" ] && cap=$budget
  echo "gpu_check: $name (at most ${cap} s; $(($(date +%s) - START)) s so far)" >&2
  before=$(wc -l < "$WORK/results.jsonl")
  timeout -k 5 "$cap" "$PY" bench/gpu_check.py "$@" "${FLAGS[@]}" >> "$WORK/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"timed out after ${cap} s\"}" >> "$WORK/results.jsonl"
  elif [ "$(wc -l < "$WORK/results.jsonl")" = "$before" ]; then  # it died before recording anything
    echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"exit $rc (see $WORK/$name.log)\"}" >> "$WORK/results.jsonl"
  fi
}

# seconds per stage: on the GPU they add up to more than the cap on purpose (each is a ceiling, most finish early)
if [ "$CPU" = 1 ]; then
  T_ENV=60 T_MODELS=90 T_DIT=90 T_VAE=90 T_MODE=90 T_NOISE=60 T_OOM=90 T_COMPILE=90  # generous: a loaded CI machine
else
  T_ENV=30 T_MODELS=90 T_DIT=90 T_VAE=90 T_MODE=60 T_NOISE=40 T_OOM=80 T_COMPILE=90
fi
stage env "$T_ENV" env
stage models "$T_MODELS" models
stage dit "$T_DIT" dit
stage vae "$T_VAE" vae
stage resident "$T_MODE" mode --memory resident
stage model "$T_MODE" mode --memory model
stage sequential "$T_MODE" mode --memory sequential
stage noise "$T_NOISE" noise
stage oom "$T_OOM" oom
stage compile "$T_COMPILE" compile

OFFLOAD="$WORK/bench_offload.md"
if [ -f bench/bench_offload.py ] && [ -z "${GPU_CHECK_SKIP_OFFLOAD:-}" ]; then
  budget=$(left)
  if [ "$budget" -ge 10 ]; then
    [ "$budget" -gt 60 ] && budget=60
    echo "gpu_check: bench/bench_offload.py (at most ${budget} s)" >&2
    args=(--frames 31)
    [ "$CPU" = 0 ] && args+=(--time --depth 8 --time-steps 2)
    timeout -k 5 "$budget" "$PY" bench/bench_offload.py "${args[@]}" > "$OFFLOAD" 2>> "$WORK/bench_offload.log"
    rc=$?
    [ "$rc" = 0 ] || echo "{\"stage\": \"bench_offload\", \"ok\": false, \"error\": \"exit $rc\"}" >> "$WORK/results.jsonl"
  else
    echo "{\"stage\": \"bench_offload\", \"ok\": false, \"error\": \"skipped: the ${TOTAL} s cap was reached\"}" >> "$WORK/results.jsonl"
  fi
fi

REPORT="$WORK/gpu_check.md"
{
  timeout -k 2 10 "$PY" bench/gpu_check.py report "${FLAGS[@]}"
  if [ -s "$OFFLOAD" ]; then
    printf '\n### bench/bench_offload.py\n\n'
    cat "$OFFLOAD"
  fi
  printf '\n(%s s in all; logs and outputs in %s)\n' "$(($(date +%s) - START))" "$WORK"
} > "$REPORT"
cat "$REPORT"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$REPORT" "$OUT/gpu_check.md"; cp "$WORK"/*.log "$OUT/" 2>/dev/null; fi
grep -q '"ok": false' "$WORK/results.jsonl" && exit 1
exit 0
