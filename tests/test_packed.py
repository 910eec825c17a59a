"""The packed (padding-free) forward: the default forward's scores, at every exit, for every architecture."""

from __future__ import annotations

import pytest
import torch

from matryoshka_reranker import MatryoshkaReranker
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.model.packed import PackedForward, packed_problem
from tests.fixtures import cpp_compiler

PAIRS = [("what is panda?", "The giant panda is a bear native to China, eating bamboo."),
         ("what is panda?", "Paris."),
         ("capital of France", "Paris is the capital and largest city of France, on the Seine."),
         ("q", ""),
         ("a much longer query about the causes of the common cold in winter", "Rhinoviruses.")]


def test_packed_scores_equal_the_default_forward_at_every_exit(tiny_lm_dir, arch):
    """Llama, Mistral and Qwen2 (q/k/v biases): the same scores as the padded default, in a ragged batch and alone."""
    reranker = MatryoshkaReranker(tiny_lm_dir, start_layer=1, batch_size=5)
    packed = MatryoshkaReranker(tiny_lm_dir, start_layer=1, batch_size=5, packed=True)
    assert packed.packed is not None and reranker.packed is None
    exits = [1, 2, 3, 4]
    expected = torch.tensor(reranker.compute_score(PAIRS, cutoff_layers=exits))
    torch.testing.assert_close(torch.tensor(packed.compute_score(PAIRS, cutoff_layers=exits)), expected,
                               atol=1e-5, rtol=1e-5)
    alone = torch.tensor([packed.compute_score([p], cutoff_layers=exits) for p in PAIRS]).squeeze(-1).T
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)


def test_compressed_calls_keep_the_default_forward(llama_dir, monkeypatch):
    """The token merge needs the padded layout: a ratio > 1 call never takes the packed forward."""
    packed = MatryoshkaReranker(llama_dir, start_layer=2, packed=True)
    plain = MatryoshkaReranker(llama_dir, start_layer=2)
    monkeypatch.setattr(PackedForward, "__call__", lambda *a, **k: pytest.fail("packed forward at ratio 2"))
    assert packed.compute_score(PAIRS, cutoff_layers=[4], compress_layers=[2], compress_ratio=2) == pytest.approx(
        plain.compute_score(PAIRS, cutoff_layers=[4], compress_layers=[2], compress_ratio=2), abs=1e-6)


def test_unsupported_models_stay_on_the_default_forward(llama_dir, caplog):
    model = MatryoshkaModel.from_pretrained(llama_dir, start_layer=2, dtype=torch.bfloat16)
    assert "float32" in packed_problem(model)
    with pytest.raises(ValueError, match="float32"):
        PackedForward(model)
    reranker = MatryoshkaReranker(llama_dir, start_layer=2, dtype="bfloat16", packed=True)
    assert reranker.packed is None and "stays on the default forward" in caplog.text
    assert len(reranker.compute_score(PAIRS)) == len(PAIRS)


@pytest.mark.skipif(not cpp_compiler(), reason="Inductor finds no C++ compiler (the eager fallback is tested apart)")
def test_compiled_packed_forward_scores_as_eager(llama_dir):
    eager = MatryoshkaReranker(llama_dir, start_layer=2, packed=True)
    compiled = MatryoshkaReranker(llama_dir, start_layer=2, packed=True, compile=True)
    assert compiled.packed.compiled  # with a compiler, a silent fall back to eager is a failure, not a skip
    torch.testing.assert_close(torch.tensor(compiled.compute_score(PAIRS, cutoff_layers=[2, 4])),
                               torch.tensor(eager.compute_score(PAIRS, cutoff_layers=[2, 4])), atol=1e-4, rtol=1e-4)


def test_qwen3_per_head_norms_stay_on_the_default_forward(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tests.fixtures import tiny_settings

    settings = tiny_settings(len(tokenizer))
    lm = AutoModelForCausalLM.from_config(Qwen3Config(**settings, head_dim=8)).eval()
    model = MatryoshkaModel(lm.base_model, 1, 1)
    assert "q/k norms" in packed_problem(model)


def test_the_compile_warm_up_runs_the_compiled_layer_even_when_the_first_exit_is_layer_1(llama_dir, monkeypatch):
    """The deepest layer of a call runs eager (last token only): a warm-up at exit 1 must still run the compiled
    layer, or the first request would compile outside the warm-up's fall back to eager."""
    from matryoshka_reranker.model import packed as packed_module

    calls = []

    def fake_compile(fn, **kwargs):
        def counted(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)
        return counted

    monkeypatch.setattr(packed_module.torch, "compile", fake_compile)
    model = MatryoshkaModel.from_pretrained(llama_dir, start_layer=1)
    forward = PackedForward(model, compile=True)
    assert forward.compiled and calls and forward.last_token_only
