#!/usr/bin/env bash
# After seed 42's chain: ratio-4 bf16 scorings of the seed-7 mse token adapter's snapshots (steps 200, 400).
set -uo pipefail
cd /work/expseed7
while kill -0 28727 2>/dev/null; do sleep 20; done
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
PATH=/work/expseed7/.venv/bin:$PATH
fe() { s=$(date +%s); python scripts/fusion_eval.py -p $1 --ratio 4 --adapters $2 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $3 > $3.log 2>&1; echo "$3 rc=$? $(( $(date +%s)-s )) s $(date)"; }
for s in 200 400; do fe params300_seed7_mse_s${s}_bf16.yaml pipeline scores300_seed7_mse_s${s}_r4_bf16.json; done
