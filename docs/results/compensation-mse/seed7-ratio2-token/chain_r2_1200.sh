#!/usr/bin/env bash
# After chain_r2token.sh: ratio-2 token adapter for 1,200 steps (seed 7), then ratio-2 scorings (test and held out).
set -uo pipefail
while pgrep -f chain_r2token.sh > /dev/null; do sleep 20; done
cd /work/expseed7
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
LO=/work/main/docs/results/compensation-mse/layer_only_fusion.py
fe() { s=$(date +%s); python $1 -p $2 --ratio 2 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
echo "start $(date)"
s=$(date +%s); matryoshka compensate -p params300_seed7_mse1200_r2.yaml --only token-ratio-2 > compensation_mse1200_r2_token_log.txt 2>&1 || exit 1
echo "token adapter r2 1200 $(( $(date +%s)-s )) s $(date)"
fe scripts/fusion_eval.py params300_seed7_mse1200_r2_bf16.yaml scores300_seed7_mse1200_r2_r2_bf16.json
fe scripts/fusion_eval.py params300_seed7_mse_r2_bf16_pseudo.yaml pv_mse600_r2_bf16.json
fe scripts/fusion_eval.py params300_seed7_mse1200_r2_bf16_pseudo.yaml pv_mse1200_r2_bf16.json
fe $LO params300_seed7_mse_r2_bf16_pseudo.yaml pv_layeronly_r2_bf16.json
echo done $(date)
