#!/usr/bin/env bash
# The GPU check (README, "GPU"): <= 8 minutes on one GPU, no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
