#!/usr/bin/env bash
# After the pseudo-query chain: seed 7's ratio-2 token adapter (same_layer_mse, 600 steps), then ratio-2 bf16 scoring.
set -uo pipefail
while pgrep -f chain_pseudo.sh > /dev/null; do sleep 20; done
cd /work/expseed7
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
echo "start $(date)"
s=$(date +%s); matryoshka compensate -p params300_seed7_mse_r2.yaml --only token-ratio-2 > compensation_mse_r2_token_log.txt 2>&1 || exit 1
echo "token adapter r2 $(( $(date +%s)-s )) s $(date)"
s=$(date +%s); python scripts/fusion_eval.py -p params300_seed7_mse_r2_bf16.yaml --ratio 2 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed7_mse_r2_r2_bf16.json > scores300_seed7_mse_r2_r2_bf16.json.log 2>&1
echo "scores rc=$? $(( $(date +%s)-s )) s $(date)"
