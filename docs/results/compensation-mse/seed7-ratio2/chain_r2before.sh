#!/usr/bin/env bash
# Ratio 2's drop on the seed-7 bf16 stack before any token adapter: self-distilled and + layer adapter, bf16 scoring.
set -uo pipefail
cd /work/expseed7
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio $4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
fe params300_seed7_mse_bf16.yaml self_distill scores300_seed7_r2_bf16.json 2
fe params300_seed7_layeronly_bf16.yaml pipeline scores300_seed7_layeronly_r2_bf16.json 2
