#!/usr/bin/env bash
# Token ratio-4 adapter for same_layer_mse, 600 steps (snapshots 200, 400) on the seed-7 stack, then ratio-4 bf16 scorings.
set -uo pipefail
cd /work/expseed7
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
s=$(date +%s); matryoshka compensate -p params300_seed7_mse.yaml --only token-ratio-4 > compensation_mse_log.txt 2>&1 || exit 1
echo "token adapter mse $(( $(date +%s)-s )) s $(date)"
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio 4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
fe params300_seed7_mse_bf16.yaml pipeline scores300_seed7_mse_r4_bf16.json
