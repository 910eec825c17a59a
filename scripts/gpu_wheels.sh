#!/usr/bin/env bash
# What a bare GPU image without internet (it has torch, onnx, onnxruntime's CPU build) lacks for
# scripts/gpu_check.sh: Python 3.12 wheels in .whl/ (about 20 MB) and the embedded model's config +
# tokenizer in .gpu/smollm2-config (the check runs with --random-weights). Run here, after `make setup`.
# On the GPU machine: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .whl .gpu/smollm2-config
specs=()
for name in transformers peft pydantic pydantic_core annotated-types typing-inspection hjson bm25s onnx_ir; do
  specs+=("$name==$($PY -m pip show "$name" | awk '/^Version/{print $2}')")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
# DeepSpeed publishes a source distribution only; its wheel is pure Python (ops compile at run time).
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  "deepspeed==$($PY -m pip show deepspeed | awk '/^Version/{print $2}')"
$PY - <<'PY'
import shutil
from pathlib import Path
from matryoshka_reranker.core.assets import resolve_model_path
source = resolve_model_path("embedded:smollm2-135m-instruct")
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (source / name).exists():
        shutil.copy(source / name, Path(".gpu/smollm2-config") / name)
PY
du -sh .whl .gpu
