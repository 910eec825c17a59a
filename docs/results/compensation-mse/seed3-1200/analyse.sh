#!/usr/bin/env bash
# The pre-registered readings for seed 3's 1,200-step token adapter (PREREGISTERED.md), run from seed 3's workspace
# (/work/expseed3: params300_seed3.yaml names the 300-query eval set, derived300); written before the scores.
# Reading 4 is post hoc (registered as such in PREREGISTERED.md, addition (a)): the three-seed recipe mean - BM25.
set -euo pipefail
R=/work/main/docs/results; M=$R/compensation-mse; D=$M/seed3-1200; D3=$M/seed3
S42=$R/scifact-cpu-rank64-1200-bf16; S7=$R/scifact-cpu-rank64-1200-bf16-seed7
py() { PYTHONPATH=src .venv/bin/python "$@"; }
# 1. seed 3 alone at 1,200 steps, as defined and factorized
py $R/scifact-cpu-rank64-1200/compensation300.py -p params300_seed3.yaml --first100 derived/eval_candidates.jsonl \
  --before $D3/scores300_seed3_bf16.json $D3/scores300_seed3_r4_bf16.json \
  --after $D3/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse1200_r4_bf16.json > $D/compensation300_mse1200_bf16.txt
py $R/scifact-cpu-rank64-1200/compensation300.py -p params300_seed3.yaml --first100 derived/eval_candidates.jsonl \
  --before $D3/scores300_seed3_layer400_w8_bf16.json $D3/scores300_seed3_layeronly_r4_bf16.json \
  --after $D3/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse1200_r4_bf16.json > $D/compensation300_mse1200_factorized_bf16.txt
# 2. three seeds, each with its 1,200-step token adapter
py $M/two_seeds300.py -p params300_seed3.yaml \
  --seed 3 $D3/scores300_seed3_bf16.json $D3/scores300_seed3_r4_bf16.json $D3/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse1200_r4_bf16.json \
  --seed 7 $S7/scores300_seed7_bf16.json $S7/scores300_seed7_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7-1200/scores300_seed7_mse1200_r4_bf16.json \
  --seed 42 $S42/scores300_bf16.json $M/seed42/scores300_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $M/seed42-1200/scores300_mse1200_r4_bf16.json \
  > $D/three_seeds_recovered_mse1200.txt
py $M/two_seeds300.py -p params300_seed3.yaml \
  --seed 3 $D3/scores300_seed3_layer400_w8_bf16.json $D3/scores300_seed3_layeronly_r4_bf16.json $D3/scores300_seed3_layer400_w8_bf16.json $D/scores300_seed3_mse1200_r4_bf16.json \
  --seed 7 $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7/scores300_seed7_layeronly_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $M/seed7-1200/scores300_seed7_mse1200_r4_bf16.json \
  --seed 42 $S42/scores300_layer400_w8_bf16.json $M/seed42/scores300_layeronly_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $M/seed42-1200/scores300_mse1200_r4_bf16.json \
  > $D/three_seeds_recovered_factorized_mse1200.txt
# 3. 1,200 against 600 token steps on seed 3 (ratio 4, both adapters): described
py $M/paired300.py -p params300_seed3.yaml --a $D/scores300_seed3_mse1200_r4_bf16.json --b $D3/scores300_seed3_mse_r4_bf16.json \
  > $D/mse1200_vs_mse600_r4.txt
# 4. (post hoc) the recipe over three seeds - BM25: layer-adapter models at ratio 1, a = seed 42, b = seed 7, c = seed 3
{ echo "a = seed 42, b = seed 7, c = seed 3 (layer-adapter models, ratio 1, bf16 scoring)"
  py $S7/replication300.py -p params300_seed3.yaml --a $S42/scores300_layer400_w8_bf16.json \
    --b $S7/scores300_seed7_layer400_w8_bf16.json --seed c $D3/scores300_seed3_layer400_w8_bf16.json; } \
  > $D/replication300_three_seeds_bf16.txt
# 5. (PREREGISTERED.md, added (b)) the same in fp32 scoring: seeds 42 / 7 as committed, seed 3 scored by fp32_seed3.sh
{ echo "a = seed 42, b = seed 7, c = seed 3 (layer-adapter models, ratio 1, fp32 scoring)"
  py $S7/replication300.py -p params300_seed3.yaml --a $S42/scores300_layer400_w8_fp32.json \
    --b $S7/scores300_seed7_layer400_w8_fp32.json --seed c $D/scores300_seed3_layer400_w8_fp32.json; } \
  > $D/replication300_three_seeds_fp32.txt
# 6. (described) ratio 4's agreement with ratio 1, per exit: layer adapter only, + 600-step and + 1,200-step token adapter
py $M/agreement300.py \
  --pair "layer adapter only" $D3/scores300_seed3_layeronly_r4_bf16.json $D3/scores300_seed3_layer400_w8_bf16.json \
  --pair "+ token adapter (mse, 600)" $D3/scores300_seed3_mse_r4_bf16.json $D3/scores300_seed3_layer400_w8_bf16.json \
  --pair "+ token adapter (mse, 1200)" $D/scores300_seed3_mse1200_r4_bf16.json $D3/scores300_seed3_layer400_w8_bf16.json \
  > $D/agreement300_mse1200.txt
# 7. (described, after the results) seed 3 fp32 against its bf16 scoring, and seed 3 against seed 7 in fp32
py $M/paired300.py -p params300_seed3.yaml --a $D/scores300_seed3_layer400_w8_fp32.json \
  --b $D3/scores300_seed3_layer400_w8_bf16.json > $D/seed3_fp32_vs_bf16.txt
py $M/paired300.py -p params300_seed3.yaml --a $D/scores300_seed3_layer400_w8_fp32.json \
  --b $S7/scores300_seed7_layer400_w8_fp32.json > $D/seed3_vs_seed7_fp32.txt
