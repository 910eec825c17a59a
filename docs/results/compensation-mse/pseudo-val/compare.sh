#!/usr/bin/env bash
# The comparisons of docs/quality.md ("Choosing the token steps without the test queries"), after chain_pseudo.sh.
# The pseudo-query set: python pseudo_val.py build --corpus data/scifact/corpus.jsonl.gz \
#   --test-qrels data/scifact/qrels/test.tsv --out /work/scratch/pseudo_val --queries 200 --params <each *_bf16.yaml>
D=/work/main/docs/results/compensation-mse
cd /work/expbf16 && python $D/pseudo_val.py compare -p params300_mse_bf16_pseudo.yaml --full pv_r1_bf16.json \
  --arm "layer adapter only" pv_layeronly_r4_bf16.json --arm "600 steps" pv_mse600_r4_bf16.json \
  --arm "1,200 steps" pv_mse1200_r4_bf16.json > $D/pseudo-val/seed42_600_vs_1200.txt
cd /work/expseed7 && python $D/pseudo_val.py compare -p params300_seed7_mse_bf16_pseudo.yaml --full pv_r1_bf16.json \
  --arm "layer adapter only" pv_layeronly_r4_bf16.json --arm "600 steps" pv_mse600_r4_bf16.json \
  --arm "1,200 steps" pv_mse1200_r4_bf16.json > $D/pseudo-val/seed7_600_vs_1200.txt
cd /work/expbf16 && python $D/pseudo_val.py compare -p params300_mse_bf16_pseudo.yaml --full pv_r1_bf16.json \
  --arm "rank 16, 600 steps" pv_mse600_r4_bf16.json --arm "rank 64, 600 steps" pv_mse_r64_r4_bf16.json \
  > $D/seed42-rank64/pseudo_val_rank64_vs_rank16.txt
