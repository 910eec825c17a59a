#!/usr/bin/env bash
# Seed 3's layer-adapter model, ratio 1, scored in fp32 (PREREGISTERED.md, added (b)), on one thread beside the token
# adapter's training (which keeps ~1.3 of the 2 cores busy).
set -uo pipefail
cd /work/expseed3
export PATH=/work/expseed3/.venv/bin:$PATH TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src MATRYOSHKA_CPU_BF16=0 OMP_NUM_THREADS=1
s=$(date +%s); python scripts/fusion_eval.py -p params300_seed3.yaml --ratio 1 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed3_layer400_w8_fp32.json > scores300_seed3_layer400_w8_fp32.json.log 2>&1
echo "fp32 scoring rc=$? $(( $(date +%s)-s )) s $(date)"
