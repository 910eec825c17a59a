#!/usr/bin/env bash
# Session 12: (1) ratio-4 token adapter by score matching for 1,200 steps (snapshots 300/600/900) on the seed-7 stack,
# scored at 1200 / 900 / 600; (2) ratio-2 token adapter by score matching (600 steps), ratio 2 scored before
# (self_distill), layer-only and after.
set -uo pipefail
cd /work/expseed7
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio $4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
s=$(date +%s); matryoshka compensate -p params300_seed7_mse1200.yaml --only token-ratio-4 > compensation_mse1200_log.txt 2>&1 && echo "token r4 1200 $(( $(date +%s)-s )) s $(date)"
fe params300_seed7_mse1200_bf16.yaml pipeline scores300_seed7_mse1200_r4_bf16.json 4
s=$(date +%s); matryoshka compensate -p params300_seed7_mse_r2.yaml --only token-ratio-2 > compensation_mse_r2_log.txt 2>&1 && echo "token r2 600 $(( $(date +%s)-s )) s $(date)"
fe params300_seed7_mse_r2_bf16.yaml pipeline scores300_seed7_mse_r2_bf16.json 2
fe params300_seed7_mse_bf16.yaml self_distill scores300_seed7_r2_bf16.json 2
fe params300_seed7_layeronly_bf16.yaml pipeline scores300_seed7_layeronly_r2_bf16.json 2
fe params300_seed7_mse1200_s900_bf16.yaml pipeline scores300_seed7_mse1200_s900_r4_bf16.json 4
fe params300_seed7_mse1200_s600_bf16.yaml pipeline scores300_seed7_mse1200_s600_r4_bf16.json 4
echo done $(date)
