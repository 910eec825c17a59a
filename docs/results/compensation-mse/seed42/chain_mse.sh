#!/usr/bin/env bash
# Seed 42's stack: ratio-4 token adapter (same_layer_mse, 600 steps, snapshots 200/400), ratio-4 bf16 scorings after and before.
set -uo pipefail
cd /work/expbf16
while kill -0 28445 2>/dev/null; do sleep 20; done  # after the seed-7 chain (its pid)
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expbf16/.venv/bin:$PATH
echo "start $(date)"
s=$(date +%s); matryoshka compensate -p params300_mse.yaml --only token-ratio-4 > compensation_mse_log.txt 2>&1 || exit 1
echo "token adapter mse $(( $(date +%s)-s )) s $(date)"
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio 4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
fe params300_mse_bf16.yaml pipeline scores300_mse_r4_bf16.json
fe params300_mse_bf16.yaml self_distill scores300_r4_bf16.json
