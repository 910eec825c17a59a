#!/usr/bin/env bash
# Seed 42's stack: ratio-4 token adapter, same_layer_mse, rank 64, 600 steps; then ratio-4 bf16 scoring.
set -uo pipefail
cd /work/expbf16
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expbf16/.venv/bin:$PATH
echo "start $(date)"
s=$(date +%s); matryoshka compensate -p params300_mse_r64.yaml --only token-ratio-4 > compensation_mse_r64_log.txt 2>&1 || exit 1
echo "token adapter mse r64 $(( $(date +%s)-s )) s $(date)"
s=$(date +%s); python scripts/fusion_eval.py -p params300_mse_r64_bf16.yaml --ratio 4 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_mse_r64_r4_bf16.json > scores300_mse_r64_r4_bf16.json.log 2>&1
echo "scores rc=$? $(( $(date +%s)-s )) s $(date)"
