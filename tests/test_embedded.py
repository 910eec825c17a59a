"""The embedded default model: offline conversion from the PyPI GGUF, and logit-lens scores."""

from __future__ import annotations

import pytest
import torch

from matryoshka_reranker.core.assets import resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model_path("embedded:smollm2-135m-instruct")  # converts once (~40 s), then cached


def test_embedded_model_is_a_plain_hf_folder(smollm2_dir):
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config


@torch.no_grad()
def test_embedded_scores_are_the_models_yes_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from matryoshka_reranker import MatryoshkaReranker

    reranker = MatryoshkaReranker(smollm2_dir)
    assert reranker.exit_layers == list(range(4, 31))
    pairs = [("what is a panda?", "The giant panda is a bear species endemic to China."),
             ("capital of France", "Paris is the capital and largest city of France.")]
    scores = reranker.compute_score(pairs, cutoff_layers=[8, 30])
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    batch = reranker.encoder.collate([reranker.encoder.encode(q, p) for q, p in pairs])
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    rows, last = torch.arange(2), batch["attention_mask"].sum(1) - 1
    yes = reranker.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    lens8 = lm.lm_head(lm.model.norm(out.hidden_states[8][rows, last]))[:, yes]
    assert scores[0] == pytest.approx(lens8.tolist(), abs=1e-4)
    assert scores[1] == pytest.approx(out.logits[rows, last, yes].tolist(), abs=1e-4)


def test_unknown_embedded_name_is_clear():
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt-17")
