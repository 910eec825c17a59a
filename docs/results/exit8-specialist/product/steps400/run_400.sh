set -e
export TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
M=.venv/bin/matryoshka
S="-S specialist.max_steps=400 -S specialist.save_steps=100 -S paths.specialists=models/specialists400 -S paths.onnx=models/onnx400 -S export.exit_layers=[8] -S paths.metrics=metrics400/per_layer.json -S paths.per_query=metrics400/per_query.json -S paths.summary=metrics400/summary.json -S paths.plots=metrics400/plots -S paths.checkpoints=checkpoints400 -S evaluation.pytorch_check=false"
t0=$(date +%s); echo "start $(date)"
$M specialize -p params_spec.yaml $S
t1=$(date +%s); echo "specialize $((t1-t0)) s"
$M export -p params_spec.yaml $S
t2=$(date +%s); echo "export $((t2-t1)) s"
$M evaluate -p params_spec.yaml $S
t3=$(date +%s); echo "evaluate $((t3-t2)) s"; echo "end $(date)"
