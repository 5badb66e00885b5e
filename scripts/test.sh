#!/usr/bin/env bash
# Lint, then the whole test suite. Assumes scripts/setup.sh --dev has run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench scripts
.venv/bin/ruff format --check src tests bench scripts
.venv/bin/python -m pytest -q "$@"
