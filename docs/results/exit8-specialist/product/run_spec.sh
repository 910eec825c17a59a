set -e
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
M=.venv/bin/matryoshka
t0=$(date +%s); echo "start $(date)"
$M specialize -p params_spec.yaml
t1=$(date +%s); echo "specialize $((t1-t0)) s"
$M export -p params_spec.yaml
t2=$(date +%s); echo "export $((t2-t1)) s"
$M evaluate -p params_spec.yaml
t3=$(date +%s); echo "evaluate $((t3-t2)) s"; echo "end $(date)"
