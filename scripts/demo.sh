#!/usr/bin/env bash
# The main job: a real ComfyUI with Cinetune runs example_workflows/k5_text_to_video.json on the
# embedded tiny Kandinsky 5 models and prints where the mp4 is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/run_demo.py "$@"
