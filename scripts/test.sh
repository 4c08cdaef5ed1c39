#!/usr/bin/env bash
# Runs the whole test suite (unit, node and end-to-end tests in a real ComfyUI) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
