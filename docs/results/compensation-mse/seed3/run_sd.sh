#!/usr/bin/env bash
cd /work/expseed3
export PATH=/work/expseed3/.venv/bin:$PATH TORCH_EXTENSIONS_DIR=/work/main/.torch_extensions DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
s=$(date +%s); echo "start $(date)"
.venv/bin/dvc exp run --name bf16-seed3 $(.venv/bin/matryoshka experiment-args scifact-cpu-rank64-1200-bf16-seed3) self_distill
echo "rc=$? $(( $(date +%s)-s )) s $(date)"
