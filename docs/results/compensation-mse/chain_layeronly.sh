#!/usr/bin/env bash
# After the snapshot scorings: ratio 4 with [self_distill, layer] only (no token adapter), both seeds, bf16.
set -uo pipefail
while kill -0 29521 2>/dev/null; do sleep 15; done
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
for d in "expseed7 params300_seed7_mse_bf16.yaml scores300_seed7_layeronly_r4_bf16.json" "expbf16 params300_mse_bf16.yaml scores300_layeronly_r4_bf16.json"; do
  set -- $d; cd /work/$1; s=$(date +%s)
  .venv/bin/python /work/scratch/layer_only_fusion.py -p $2 --ratio 4 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1
  echo "$1 $3 rc=$? $(( $(date +%s)-s )) s $(date)"
done
