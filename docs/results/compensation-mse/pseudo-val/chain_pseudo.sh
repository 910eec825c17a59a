#!/usr/bin/env bash
# Held-out pseudo-query scorings (PREREGISTERED.md), after the seed-42 rank-64 chain; bf16, 200 x 20 pairs each.
set -uo pipefail
while pgrep -f chain_mse_r64.sh > /dev/null; do sleep 20; done
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
LO=/work/main/docs/results/compensation-mse/layer_only_fusion.py
fe() { s=$(date +%s); .venv/bin/python $1 -p $2 --ratio $3 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $4 > $4.log 2>&1; echo "$PWD $4 rc=$? $(( $(date +%s)-s )) s $(date)"; }
cd /work/expbf16
fe scripts/fusion_eval.py params300_mse_bf16_pseudo.yaml 1 pv_r1_bf16.json
fe scripts/fusion_eval.py params300_mse_bf16_pseudo.yaml 4 pv_mse600_r4_bf16.json
fe scripts/fusion_eval.py params300_mse1200_bf16_pseudo.yaml 4 pv_mse1200_r4_bf16.json
fe $LO params300_mse_bf16_pseudo.yaml 4 pv_layeronly_r4_bf16.json
cd /work/expseed7
fe scripts/fusion_eval.py params300_seed7_mse_bf16_pseudo.yaml 1 pv_r1_bf16.json
fe scripts/fusion_eval.py params300_seed7_mse_bf16_pseudo.yaml 4 pv_mse600_r4_bf16.json
fe scripts/fusion_eval.py params300_seed7_mse1200_bf16_pseudo.yaml 4 pv_mse1200_r4_bf16.json
fe $LO params300_seed7_mse_bf16_pseudo.yaml 4 pv_layeronly_r4_bf16.json
cd /work/expbf16
[ -f models/comp_mse_r64/token-ratio-4/adapter_model.safetensors ] && fe scripts/fusion_eval.py params300_mse_r64_bf16_pseudo.yaml 4 pv_mse_r64_r4_bf16.json
echo done $(date)
