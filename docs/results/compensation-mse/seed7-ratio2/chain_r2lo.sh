#!/usr/bin/env bash
cd /work/expseed7
while kill -0 25125 2>/dev/null; do sleep 5; done
echo "r2 self_distill done $(date)"
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
s=$(date +%s); .venv/bin/python /work/main/docs/results/compensation-mse/layer_only_fusion.py -p params300_seed7_mse_bf16.yaml --ratio 2 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed7_layeronly_r2_bf16.json > scores300_seed7_layeronly_r2_bf16.json.log 2>&1
echo "layeronly r2 rc=$? $(( $(date +%s)-s )) s $(date)"
