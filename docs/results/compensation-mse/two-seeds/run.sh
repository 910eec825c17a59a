#!/usr/bin/env bash
# The two-seed tables of docs/quality.md ("Both seeds at once"): run from /work/expbf16 (seed 42's workspace,
# whose params300.yaml names the 300-query eval set both seeds were scored on); S7 = seed 7's workspace.
S7=/work/expseed7; S42=/work/expbf16; D=/work/main/docs/results/compensation-mse
# as defined: before = self-distilled r1 / r4, after = + layer adapter r1 / + layer + token adapter r4
run() { python $D/two_seeds300.py -p params300.yaml \
  --seed 7 $S7/scores300_seed7_bf16.json $S7/scores300_seed7_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $S7/scores300_seed7_$1_r4_bf16.json \
  --seed 42 $S42/scores300_bf16.json $S42/scores300_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $S42/scores300_$1_r4_bf16.json; }
# factorized: before = + layer adapter r1 / r4 without a token adapter, after = + layer adapter r1 / + token adapter r4
runf() { python $D/two_seeds300.py -p params300.yaml \
  --seed 7 $S7/scores300_seed7_layer400_w8_bf16.json $S7/scores300_seed7_layeronly_r4_bf16.json $S7/scores300_seed7_layer400_w8_bf16.json $S7/scores300_seed7_$1_r4_bf16.json \
  --seed 42 $S42/scores300_layer400_w8_bf16.json $S42/scores300_layeronly_r4_bf16.json $S42/scores300_layer400_w8_bf16.json $S42/scores300_$1_r4_bf16.json; }
run mse1200 > $D/two-seeds/recovered_mse1200.txt; runf mse1200 > $D/two-seeds/recovered_factorized_mse1200.txt
run mse > $D/two-seeds/recovered_mse600.txt; runf mse > $D/two-seeds/recovered_factorized_mse600.txt
