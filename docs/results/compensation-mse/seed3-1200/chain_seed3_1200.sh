#!/usr/bin/env bash
# Seed 3's ratio-4 token adapter for 1,200 steps (PREREGISTERED.md), then its bf16 scoring; run from seed 3's
# workspace, whose models/compensation_w8_400/layer is the layer adapter the token adapter trains on top of.
set -uo pipefail
cd /work/expseed3
export PATH=/work/expseed3/.venv/bin:$PATH TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
mkdir -p models/comp_mse1200 && rm -rf models/comp_mse1200/layer && cp -r models/compensation_w8_400/layer models/comp_mse1200/layer
s=$(date +%s); matryoshka compensate -p params300_seed3_mse1200.yaml --only token-ratio-4 > compensation_mse1200_log.txt 2>&1 || { echo "token adapter failed rc=$?"; exit 1; }
echo "token adapter mse 1200 $(( $(date +%s)-s )) s $(date)"
s=$(date +%s); python scripts/fusion_eval.py -p params300_seed3_mse1200_bf16.yaml --ratio 4 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed3_mse1200_r4_bf16.json > scores300_seed3_mse1200_r4_bf16.json.log 2>&1
echo "scoring rc=$? $(( $(date +%s)-s )) s $(date)"
