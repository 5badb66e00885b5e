#!/usr/bin/env bash
# Create .venv and install mochi-preview into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    plus the test, lint and benchmark tools
#   scripts/setup.sh --ui     plus the web UI
#   scripts/setup.sh --browser  plus Debian's chromium for the web UI's browser test (needs root or sudo)
# PyTorch: the CUDA build where an NVIDIA driver is present, else the CPU build (torch==2.13.0).
# Set TORCH_SPEC (e.g. "torch==2.13.0") or TORCH_INDEX_URL to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=()
browser=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev bench) ;;
    --ui) extras+=(ui) ;;
    --browser) browser=1 ;;
    *) echo "setup.sh: unknown option $arg (valid: --dev, --ui, --browser)" >&2; exit 2 ;;
  esac
done

if [ "$browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian's chromium (for the web UI test)"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  torch_spec=${TORCH_SPEC:-torch}
else
  torch_spec=${TORCH_SPEC:-torch==2.13.0}
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $torch_spec"
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
fi

target="."
if [ ${#extras[@]} -gt 0 ]; then target=".[$(IFS=,; echo "${extras[*]}")]"; fi
echo "setup: installing mochi-preview $target"
"${pip[@]}" -e "$target"
echo "setup: done (.venv)"
