"""Builders for tiny offline models and tokenizers, shared by tests and the tiny pipeline config."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "A: what causes the common cold? B: Rhinoviruses cause most colds in adults and children.",
    "Predict whether passage B contains an answer to query A. Yes No",
    "The mitochondria is the powerhouse of the cell; ATP synthesis happens in its inner membrane.",
    "Vitamin D deficiency is associated with bone loss, and sunlight helps the skin make vitamin D.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "0-dimensional biomaterials lack inductive properties. Stem cells differentiate in vitro.",
]


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: offline, deterministic, covers any text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, vocab_size: int, num_layers: int = 4):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def tiny_settings(vocab_size: int) -> dict:
    """``tiny_config``'s sizes and special tokens as keyword arguments, for another architecture's config class
    (Qwen3, Granite, SmolLM3 in the layer-layout tests)."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
    return {k: v for k, v in tiny_config("llama", vocab_size).to_dict().items() if k in keys}


def make_tiny_model(arch: str, tokenizer, num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), num_layers))
    return model.eval()


def run_stage_with_workers(stage: str, params_file, cwd, workers: int):
    """``matryoshka <stage> -S distributed.processes=<workers>`` in a subprocess with this checkout's
    code and no inherited launcher variables (so the stage starts its own workers)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}:{root}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "matryoshka_reranker.cli", stage, "-p", str(params_file),
                           "-S", f"distributed.processes={workers}"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def cpp_compiler() -> bool:
    """Whether Inductor finds a C++ compiler (torch.compile's CPU backend needs one)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except Exception:  # noqa: BLE001
        return False
