"""Model core: logit-lens equality, batch independence, compression, persistence."""

from __future__ import annotations

import pytest
import torch

from matryoshka_reranker.model.inputs import InputFormat, PairEncoder, yes_token_id
from matryoshka_reranker.model.modeling import (
    MatryoshkaModel,
    attention_bias,
    last_token_attention,
    merge_passage_tokens,
)

PAIRS = [
    ("what causes the common cold?", "Rhinoviruses cause most colds in adults and children, spread by hands."),
    ("capital of France", "Paris is the capital of France."),
    ("vitamin D", "Sunlight helps the skin make vitamin D; deficiency is associated with bone loss in adults."),
    ("q", "x"),
]


def wrap(lm, tokenizer, start_layer=1):
    yes = yes_token_id(tokenizer)
    return MatryoshkaModel(lm.base_model, start_layer, 1, head_init=lm.lm_head.weight[yes].detach().clone()).eval()


def batch(tokenizer, pairs, max_length=64):
    encoder = PairEncoder(tokenizer, InputFormat(query_max_len=max_length // 2, passage_max_len=max_length // 2))
    return encoder.collate([encoder.encode(q, p) for q, p in pairs])


@torch.no_grad()
def test_scores_equal_logit_lens_yes_logit(tiny_lm, tokenizer):
    model = wrap(tiny_lm, tokenizer)
    inputs = batch(tokenizer, PAIRS)
    scores = model(**inputs, cutoff_layers=[1, 2, 3, 4])
    out = tiny_lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    rows, last = torch.arange(len(PAIRS)), inputs["attention_mask"].sum(1) - 1
    yes = yes_token_id(tokenizer)
    for k in range(1, 4):  # hidden_states[k] before the final norm for k < num_layers
        lens = tiny_lm.lm_head(tiny_lm.model.norm(out.hidden_states[k][rows, last]))[:, yes]
        torch.testing.assert_close(scores[k - 1], lens, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[3], out.logits[rows, last, yes], atol=1e-5, rtol=0)


@torch.no_grad()
def test_early_exit_runs_only_needed_layers_and_the_last_for_one_token_per_row(tiny_lm, tokenizer):
    model = wrap(tiny_lm, tokenizer)
    calls = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o, n=n: calls.append((n, tuple(i[0].shape[:-1]))))
             for n, layer in enumerate(model.decoder.layers)]
    inputs = batch(tokenizer, PAIRS[:3])
    model(**inputs, cutoff_layers=2)
    for hook in hooks:
        hook.remove()
    assert calls == [(0, tuple(inputs["input_ids"].shape)), (1, (3, 1))]  # layer 2's MLP: one token per row


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("compress", [dict(), dict(compress_layers=[1], compress_ratio=2),
                                      dict(compress_layers=[3], compress_ratio=3)])  # 3: right before the last layer
def test_the_last_layer_run_for_the_last_token_scores_as_the_full_layer(tiny_lm, tokenizer, implementation, compress):
    model = wrap(tiny_lm, tokenizer)
    model.config._attn_implementation = implementation
    inputs = batch(tokenizer, PAIRS)
    for exits in ([2], [2, 4], [4]):
        trimmed = model(**inputs, cutoff_layers=exits, **compress)
        state = model.embed(inputs["input_ids"], inputs["attention_mask"], inputs["query_lengths"],
                            inputs["prompt_lengths"])
        _, full = model.advance(state, max(exits), set(exits), compress.get("compress_layers", ()),
                                compress.get("compress_ratio", 1))
        for k, scores in zip(exits, trimmed):
            torch.testing.assert_close(scores, full[k], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_last_token_layer_matches_a_qwen3_layer_with_per_head_norms(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from matryoshka_reranker.model.modeling import last_token_layer, trim_problem
    from tests.fixtures import tiny_settings

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(Qwen3Config(**tiny_settings(len(tokenizer)), head_dim=8)).eval()
    layer = lm.model.layers[2]
    assert trim_problem(layer) is None and layer.self_attn.q_norm is not None
    inputs = batch(tokenizer, PAIRS)
    mask = inputs["attention_mask"]
    out = lm(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True)
    last, rows = mask.sum(1) - 1, torch.arange(len(PAIRS))
    got = last_token_layer(layer, out.hidden_states[2], mask, lm.model.rotary_emb)
    torch.testing.assert_close(got, out.hidden_states[3][rows, last], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["granite", "smollm3"])
def test_look_alike_layers_of_other_forwards_run_whole(tokenizer, kind):
    """Granite (scaled residuals) and SmolLM3 (no RoPE every 4th layer) have a Llama layer's sub-modules but
    another forward: the allowlist keeps them whole, so forward still equals the layer-by-layer scores."""
    from transformers import AutoModelForCausalLM, GraniteConfig, SmolLM3Config

    from matryoshka_reranker.model.modeling import trim_problem
    from tests.fixtures import tiny_settings

    settings = tiny_settings(len(tokenizer))
    config = GraniteConfig(**settings, residual_multiplier=0.5) if kind == "granite" else SmolLM3Config(**settings)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    model = wrap(lm, tokenizer)
    assert "not one of the layer classes" in trim_problem(model.decoder.layers[3])
    inputs = batch(tokenizer, PAIRS)
    state = model.embed(inputs["input_ids"], inputs["attention_mask"])
    _, whole = model.advance(state, 4, {4})
    torch.testing.assert_close(model(**inputs, cutoff_layers=4)[0], whole[4], atol=1e-6, rtol=1e-6)
    # compression's merge weights recompute a layer's attention the Llama way: refused, not silently wrong
    with pytest.raises(ValueError, match="cannot compress at layer 2.*not one of the layer classes"):
        model(**inputs, cutoff_layers=4, compress_layers=[2], compress_ratio=2)
    assert model(**inputs, cutoff_layers=4, compress_layers=[2], compress_ratio=1)[0].shape == (len(PAIRS),)


@torch.no_grad()
def test_a_layer_of_another_layout_runs_whole(tiny_lm, tokenizer):
    """An extra sub-module (Gemma's extra norms, say) is a layout ``last_token_layer`` does not know: the layer runs whole."""
    from matryoshka_reranker.model.modeling import trim_problem

    model = wrap(tiny_lm, tokenizer)
    inputs = batch(tokenizer, PAIRS)
    before = model(**inputs, cutoff_layers=[2, 4])
    for layer in model.decoder.layers:
        layer.pre_feedforward_layernorm = torch.nn.Identity()
    assert "other sub-modules" in trim_problem(model.decoder.layers[3])
    calls = []
    hook = model.decoder.layers[3].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    after = model(**inputs, cutoff_layers=[2, 4])
    hook.remove()
    assert calls == [inputs["input_ids"].shape + (model.config.hidden_size,)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compress", [dict(), dict(compress_layers=[2], compress_ratio=2), dict(compress_layers=[1, 3], compress_ratio=3)])
@torch.no_grad()
def test_row_scores_do_not_depend_on_the_batch(tiny_lm, tokenizer, compress):
    model = wrap(tiny_lm, tokenizer)
    together = model(**batch(tokenizer, PAIRS), cutoff_layers=[2, 4], **compress)
    for i, pair in enumerate(PAIRS):
        alone = model(**batch(tokenizer, [pair]), cutoff_layers=[2, 4], **compress)
        for layer_scores, alone_scores in zip(together, alone):
            assert abs(layer_scores[i].item() - alone_scores[0].item()) < 1e-5


@torch.no_grad()
def test_compression_changes_only_later_layers(tiny_lm, tokenizer):
    model = wrap(tiny_lm, tokenizer)
    inputs = batch(tokenizer, PAIRS[:3])
    full = model(**inputs, cutoff_layers=[2, 4])
    compressed = model(**inputs, cutoff_layers=[2, 4], compress_layers=[2], compress_ratio=4)
    torch.testing.assert_close(full[0], compressed[0])  # exit 2 runs before compression at 2
    assert (full[1] - compressed[1]).abs().max() > 1e-6
    ratio_one = model(**inputs, cutoff_layers=[4], compress_layers=[2], compress_ratio=1)
    torch.testing.assert_close(full[1], ratio_one[0])


def test_merge_passage_tokens_hand_example():
    # Row 0: query 2 tokens, passage 5 tokens, prompt 1 token, no padding. Row 1: query 1,
    # passage 2, prompt 2, then 3 padding tokens.
    hidden = torch.arange(1, 9, dtype=torch.float32).view(1, 8, 1).repeat(2, 1, 2)  # value = position + 1
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    query_lengths, prompt_lengths = torch.tensor([2, 1]), torch.tensor([1, 2])
    weights = torch.tensor([[9, 9, 1, 3, 2, 2, 5, 9], [9, 1, 1, 9, 9, 0, 0, 0]], dtype=torch.float32)
    out, new_mask = merge_passage_tokens(hidden, mask, query_lengths, prompt_lengths, weights, ratio=2)
    # Row 0 groups: (pos 3,4) weights 1,3 -> (3*1 + 4*3)/4 = 3.75; (5,6) 2,2 -> 5.5; (7) alone -> 7.
    expected0 = torch.tensor([1, 2, 3.75, 5.5, 7, 8])
    # Row 1 group: (pos 2,3) weights 1,1 -> 2.5; query 1, prompt 4, 5; then padding zeros.
    expected1 = torch.tensor([1, 2.5, 4, 5, 0, 0])
    assert out.shape == (2, 6, 2)
    torch.testing.assert_close(out[0, :, 0], expected0)
    torch.testing.assert_close(out[1, :, 1], expected1)
    assert new_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_merge_passage_tokens_zero_weights_average():
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [7.0]]])
    out, _ = merge_passage_tokens(hidden, torch.ones(1, 4, dtype=torch.long), torch.tensor([1]), torch.tensor([1]),
                                  torch.zeros(1, 4), ratio=2)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 3.0, 7.0]))


@torch.no_grad()
def test_last_token_attention_matches_eager_attention(tokenizer):
    from tests.fixtures import make_tiny_model

    lm = make_tiny_model("qwen2", tokenizer)
    lm.config._attn_implementation = "eager"
    inputs = batch(tokenizer, PAIRS[:3])
    mask = inputs["attention_mask"]
    out = lm(input_ids=inputs["input_ids"], attention_mask=mask, output_attentions=True, output_hidden_states=True)
    weights = last_token_attention(lm.model.layers[1], out.hidden_states[1], mask, lm.model.rotary_emb)
    last = mask.sum(1) - 1
    expected = out.attentions[1][torch.arange(3), :, last].sum(1)  # (B, T), summed over heads
    torch.testing.assert_close(weights, expected * mask, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("compress_at", [1, 2, 3])
def test_compression_merges_with_the_attention_of_the_layer_just_run(tiny_lm, tokenizer, monkeypatch, compress_at):
    """Compress at c: the states merged are hidden_states[c], and their weights are layer c's (1-based)
    attention probabilities of each row's last real token, summed over heads, as transformers' own eager
    attention gives them (an independent derivation: using another layer's attention, or the states of
    another depth, changed the compressed scores by ~1e-4 only, which no other test but the loss pin saw)."""
    from matryoshka_reranker.model import modeling

    tiny_lm.config._attn_implementation = "eager"  # output_attentions needs eager; shared with the wrapped decoder
    model = wrap(tiny_lm, tokenizer)
    inputs = batch(tokenizer, PAIRS)
    seen = []
    real = modeling.merge_passage_tokens

    def spy(hidden, mask, query_lengths, prompt_lengths, weights, ratio):
        seen.append((hidden.clone(), weights.clone()))
        return real(hidden, mask, query_lengths, prompt_lengths, weights, ratio)

    monkeypatch.setattr(modeling, "merge_passage_tokens", spy)
    model(**inputs, cutoff_layers=[4], compress_layers=[compress_at], compress_ratio=2)
    mask = inputs["attention_mask"]
    out = tiny_lm(input_ids=inputs["input_ids"], attention_mask=mask, output_attentions=True, output_hidden_states=True)
    rows, last = torch.arange(len(PAIRS)), mask.sum(1) - 1
    expected = out.attentions[compress_at - 1][rows, :, last].sum(1) * mask  # (B, T), layer c's, over heads
    assert len(seen) == 1
    hidden, weights = seen[0]
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    real_tokens = mask.bool()
    torch.testing.assert_close(hidden[real_tokens], out.hidden_states[compress_at][real_tokens], atol=1e-5, rtol=1e-4)


def test_attention_bias_is_causal_only_and_none_for_sdpa():
    bias = attention_bias(torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.float32)
    assert bias.shape == (1, 1, 3, 3)  # shared by the batch
    assert (bias[0, 0] == 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert attention_bias(torch.tensor([[1, 1, 0]]), torch.float32, "sdpa") is None  # SDPA's fused causal kernel


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_real_tokens_never_need_a_padding_mask(tiny_lm, tokenizer, implementation):
    """Right padding + causal attention: every real token's state equals the unpadded row's, so the
    layers get no padding mask at all (the padding positions' own states are never read)."""
    model = wrap(tiny_lm, tokenizer)
    model.config._attn_implementation = implementation
    inputs = batch(tokenizer, PAIRS)
    padded = model(**inputs, cutoff_layers=[1, 4], compress_layers=[2], compress_ratio=2)
    for row in range(len(PAIRS)):
        one = batch(tokenizer, [PAIRS[row]])
        alone = model(**one, cutoff_layers=[1, 4], compress_layers=[2], compress_ratio=2)
        for exit_scores, single in zip(padded, alone):
            torch.testing.assert_close(exit_scores[row], single[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_save_load_round_trip_is_bit_identical(tiny_lm, tokenizer, tmp_path):
    model = wrap(tiny_lm, tokenizer, start_layer=2)
    with torch.no_grad():
        model.score_heads["3"].weight.add_(0.5)  # heads differ from their init and must survive
    inputs = batch(tokenizer, PAIRS)
    before = model(**inputs, cutoff_layers=[2, 3, 4], compress_layers=[2], compress_ratio=2)
    model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer)
    loaded = MatryoshkaModel.from_pretrained(tmp_path / "saved")
    assert loaded.exit_layers == [2, 3, 4]
    after = loaded(**inputs, cutoff_layers=[2, 3, 4], compress_layers=[2], compress_ratio=2)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="start_layer=2"):
        MatryoshkaModel.from_pretrained(tmp_path / "saved", start_layer=3)


def test_raw_checkpoint_heads_start_from_yes_row(tiny_lm_dir, tiny_lm, tokenizer):
    model = MatryoshkaModel.from_pretrained(tiny_lm_dir, start_layer=2, layer_sep=2)
    assert model.exit_layers == [2, 4]
    yes = yes_token_id(tokenizer)
    torch.testing.assert_close(model.score_heads["4"].weight[0], tiny_lm.lm_head.weight[yes])


def test_invalid_arguments_are_rejected(tiny_lm, tokenizer):
    model = wrap(tiny_lm, tokenizer, start_layer=2)
    inputs = batch(tokenizer, PAIRS[:1])
    with pytest.raises(ValueError, match="no score head"):
        model(**inputs, cutoff_layers=[1])
    with pytest.raises(ValueError, match="compress_ratio"):
        model(**inputs, compress_layers=[2], compress_ratio=0)
    with pytest.raises(ValueError, match="outside"):
        model(**inputs, compress_layers=[4], compress_ratio=2)
    with pytest.raises(ValueError, match="query_lengths"):
        model(inputs["input_ids"], inputs["attention_mask"], compress_layers=[2], compress_ratio=2)


def test_an_architecture_whose_forward_does_more_than_our_loop_is_refused_at_load(tokenizer, tmp_path):
    """Granite multiplies its embeddings (and residuals) inside its own forward: our embed -> layers -> norm loop
    would score it wrongly, so loading it fails with a clear error instead."""
    from transformers import AutoModelForCausalLM, GraniteConfig

    from tests.fixtures import tiny_settings

    settings = tiny_settings(len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GraniteConfig(**settings, embedding_multiplier=12.0)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GraniteModel: this architecture's forward is not"):
        MatryoshkaModel.from_pretrained(tmp_path, start_layer=1)


def test_supported_architectures_pass_the_load_check(tiny_lm_dir):
    MatryoshkaModel.from_pretrained(tiny_lm_dir, start_layer=1).check_architecture()  # Llama, Mistral, Qwen2


def test_a_decoder_without_the_llama_layout_is_refused_by_name(tmp_path, tokenizer):
    """Phi-2's base model has ``final_layernorm``, not ``norm``: a clear ValueError at load, not an AttributeError
    from the first forward (the CLI reports ValueErrors as errors, without a traceback)."""
    from transformers import AutoModelForCausalLM, PhiConfig

    from matryoshka_reranker.model.modeling import MatryoshkaModel

    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    with pytest.raises(ValueError, match="PhiModel has no norm: not the Llama-family layout"):
        MatryoshkaModel.from_pretrained(tmp_path / "phi", start_layer=1)
