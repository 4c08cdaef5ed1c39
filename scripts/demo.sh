#!/usr/bin/env bash
# The main job: a real ComfyUI with Cinetune runs the example workflows (K5 text-to-video, K5 LoRA training,
# LTX-2 text-to-video with sound) on the embedded tiny models and prints where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/run_demo.py "$@"
