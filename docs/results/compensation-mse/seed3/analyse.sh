#!/usr/bin/env bash
# The pre-registered readings for seed 3 (PREREGISTERED.md), run from seed 3's workspace (chain_seed3b.sh wrote its
# scores there; copies sit beside this file). params300_seed3.yaml names the 300-query eval set (derived300).
set -euo pipefail
R=/work/main/docs/results; M=$R/compensation-mse; D=$M/seed3
S42=$R/scifact-cpu-rank64-1200-bf16; S7=$R/scifact-cpu-rank64-1200-bf16-seed7
py() { PYTHONPATH=src .venv/bin/python "$@"; }
# 1. seed 3 alone, as defined (before: self-distilled r1 / r4; after: + layer r1 / + layer + token r4) and factorized
py $R/scifact-cpu-rank64-1200/compensation300.py -p params300_seed3.yaml --first100 derived/eval_candidates.jsonl \
  --before $D/scores300_seed3_bf16.json $D/scores300_seed3_r4_bf16.json \
  --after $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse_r4_bf16.json > $D/compensation300_mse_bf16.txt
py $R/scifact-cpu-rank64-1200/compensation300.py -p params300_seed3.yaml --first100 derived/eval_candidates.jsonl \
  --before $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_layeronly_r4_bf16.json \
  --after $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse_r4_bf16.json > $D/compensation300_mse_factorized_bf16.txt
# 2. three seeds, each with its 600-step token adapter
py $M/two_seeds300.py -p params300_seed3.yaml \
  --seed 3 $D/scores300_seed3_bf16.json $D/scores300_seed3_r4_bf16.json $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse_r4_bf16.json \
  --seed 7 $S7/scores300_seed7_bf16.json $S7/scores300_seed7_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7/scores300_seed7_mse_r4_bf16.json \
  --seed 42 $S42/scores300_bf16.json $M/seed42/scores300_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $M/seed42/scores300_mse_r4_bf16.json \
  > $D/three_seeds_recovered_mse600.txt
py $M/two_seeds300.py -p params300_seed3.yaml \
  --seed 3 $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_layeronly_r4_bf16.json $D/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse_r4_bf16.json \
  --seed 7 $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7/scores300_seed7_layeronly_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7/scores300_seed7_mse_r4_bf16.json \
  --seed 42 $S42/scores300_layer400_w8_bf16.json $M/seed42/scores300_layeronly_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $M/seed42/scores300_mse_r4_bf16.json \
  > $D/three_seeds_recovered_factorized_mse600.txt
# 3. above BM25 a third time: seed 3's layer-adapter model, ratio 1 (seed 42 as the other seed of the script)
py $R/scifact-cpu-rank64-1200-bf16-seed7/replication300.py -p params300_seed3.yaml \
  --a $S42/scores300_layer400_w8_bf16.json --b $D/scores300_seed3_layer400_w8_bf16.json > $D/replication300_seed3_bf16.txt
