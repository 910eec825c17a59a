#!/usr/bin/env bash
# Replication on seed 42 (decided before the run, after seed 7's 1,200-step result): ratio-4 token adapter by score
# matching for 1,200 steps, ratio 4 scored in bf16 on the 300 test queries.
set -uo pipefail
cd /work/expbf16
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expbf16/.venv/bin:$PATH
s=$(date +%s); matryoshka compensate -p params300_mse1200.yaml --only token-ratio-4 > compensation_mse1200_log.txt 2>&1 || exit 1
echo "token adapter mse 1200 $(( $(date +%s)-s )) s $(date)"
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio 4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
fe params300_mse1200_bf16.yaml pipeline scores300_mse1200_r4_bf16.json
