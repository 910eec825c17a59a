#!/usr/bin/env bash
# Seed 3 after self-distillation (second version: the self-distilled model's two scorings run beside the
# layer adapter's training, and the layer adapter's two beside the token adapter's, on one thread each, since
# training keeps only ~1.3 of the 2 cores busy).
set -uo pipefail
cd /work/expseed3
while pgrep -f run_sd.sh > /dev/null; do sleep 20; done
grep -q "^rc=0" /work/scratch/sd_seed3.log || { echo "self-distillation failed"; exit 1; }
export PATH=/work/expseed3/.venv/bin:$PATH TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
t() { s=$(date +%s); "$@"; echo "rc=$? $(( $(date +%s)-s )) s $(date) :: $*"; }
fe() { [ -s $4 ] || t python scripts/fusion_eval.py -p $1 --ratio $2 --adapters $3 --exits 8 --exits 16 --exits 24 --exits 30 --scores-out $4 > $4.log 2>&1; }
( export OMP_NUM_THREADS=1; fe params300_seed3_bf16.yaml 1 self_distill scores300_seed3_bf16.json
  fe params300_seed3_bf16.yaml 4 self_distill scores300_seed3_r4_bf16.json; echo "side done $(date)" ) > /work/scratch/side_seed3.log 2>&1 &
side=$!
t matryoshka prepare -p params300_seed3.yaml > prepare300_log.txt 2>&1
t matryoshka compensate -p params300_seed3.yaml --only layer > compensation_layer400_w8_log.txt 2>&1 || exit 1
mkdir -p models/comp_mse && rm -rf models/comp_mse/layer && cp -r models/compensation_w8_400/layer models/comp_mse/layer
wait $side
( export OMP_NUM_THREADS=1; fe params300_seed3_bf16.yaml 1 pipeline scores300_seed3_layer400_w8_bf16.json
  [ -s scores300_seed3_layeronly_r4_bf16.json ] || t python /work/main/docs/results/compensation-mse/layer_only_fusion.py -p params300_seed3_mse_bf16.yaml --ratio 4 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed3_layeronly_r4_bf16.json > layeronly.log 2>&1
  echo "side 2 done $(date)" ) >> /work/scratch/side_seed3.log 2>&1 &
side=$!
t matryoshka compensate -p params300_seed3_mse.yaml --only token-ratio-4 > compensation_mse_log.txt 2>&1
fe params300_seed3_mse_bf16.yaml 4 pipeline scores300_seed3_mse_r4_bf16.json
[ -s scores300_seed3_layeronly_r4_bf16.json ] || t python /work/main/docs/results/compensation-mse/layer_only_fusion.py -p params300_seed3_mse_bf16.yaml --ratio 4 --adapters pipeline --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores300_seed3_layeronly_r4_bf16.json > layeronly.log 2>&1
fe params300_seed3_bf16.yaml 1 pipeline scores300_seed3_layer400_w8_bf16.json
wait $side
fe params300_seed3_bf16.yaml 1 self_distill scores300_seed3_bf16.json
fe params300_seed3_bf16.yaml 4 self_distill scores300_seed3_r4_bf16.json
echo "chain done $(date)"
