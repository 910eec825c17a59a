"""Tiny CPU fixtures: a byte-level BPE tokenizer trained in memory and tiny random decoders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning workers starve the
# test's own subprocesses (DVC stages, Prefect server). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Score in fp32 on every CPU, AMX or not, so the suite (and the DVC/CLI subprocesses it starts) checks
# the same numbers on every machine; tests/test_hardware.py covers the AMX bf16 choice itself.
os.environ["MATRYOSHKA_CPU_BF16"] = "0"

import pytest
import torch

from tests.fixtures import make_tiny_model, make_tokenizer

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_lm(arch, tokenizer):
    """A randomly initialised causal LM of the given architecture (4 layers, hidden 32)."""
    return make_tiny_model(arch, tokenizer)


@pytest.fixture
def tiny_lm_dir(tmp_path, tiny_lm, tokenizer):
    path = tmp_path / "tiny-lm"
    tiny_lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama checkpoint + tokenizer, shared across a session (read-only)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
