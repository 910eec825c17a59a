"""The input format: segments, lengths, truncation, right padding."""

from __future__ import annotations

import pytest

from matryoshka_reranker.inputs import DEFAULT_PROMPT, PairEncoder


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_layout_matches_upstream_format(tokenizer):
    encoder = PairEncoder(tokenizer, max_length=128)
    pair = encoder.encode("what causes colds?", "Rhinoviruses do.")
    sep = ids(tokenizer, "\n")
    expected = (
        [tokenizer.bos_token_id] + ids(tokenizer, "A: what causes colds?") + sep
        + ids(tokenizer, "B: Rhinoviruses do.") + sep + ids(tokenizer, DEFAULT_PROMPT)
    )
    assert pair.input_ids == expected
    assert pair.query_length == 1 + len(ids(tokenizer, "A: what causes colds?")) + len(sep)
    assert pair.prompt_length == len(sep) + len(ids(tokenizer, DEFAULT_PROMPT))
    assert pair.passage_length == len(ids(tokenizer, "B: Rhinoviruses do."))


def test_truncation_keeps_prompt_and_bounds_query_plus_passage(tokenizer):
    encoder = PairEncoder(tokenizer, max_length=24, query_max_len=6)
    pair = encoder.encode("a very long query " * 10, "a very long passage " * 50, prompt="Yes?")
    assert pair.query_length == 1 + 6 + len(ids(tokenizer, "\n"))
    assert pair.query_length + pair.passage_length == 24
    assert pair.input_ids[-pair.prompt_length:] == ids(tokenizer, "\n") + ids(tokenizer, "Yes?")


def test_collate_right_pads(tokenizer):
    encoder = PairEncoder(tokenizer, max_length=64)
    a, b = encoder.encode("q", "short"), encoder.encode("longer query", "a longer passage here")
    batch = encoder.collate([a, b])
    width = len(b.input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), width]
    assert batch["input_ids"][0, len(a.input_ids):].eq(tokenizer.pad_token_id).all()
    assert batch["query_lengths"].tolist() == [a.query_length, b.query_length]


def test_non_string_inputs_rejected(tokenizer):
    with pytest.raises(TypeError, match="strings"):
        PairEncoder(tokenizer).encode("q", None)
