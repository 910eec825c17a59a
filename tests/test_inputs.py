"""The input format: segments, lengths, truncation, right padding."""

from __future__ import annotations

import pytest

from matryoshka_reranker.model.inputs import (
    DEFAULT_PROMPT,
    FORMAT_FILE,
    InputFormat,
    InputFormatError,
    PairEncoder,
    as_pair_list,
    resolve_format,
)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fmt(max_length=128, query_max_len=None, prompt=DEFAULT_PROMPT):
    """A format whose query + passage budget is ``max_length`` (query 3/4 of it unless given)."""
    query = query_max_len or max_length * 3 // 4
    return InputFormat(prompt, query, max_length - query)


def test_layout_matches_upstream_format(tokenizer):
    encoder = PairEncoder(tokenizer, fmt(128))
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
    encoder = PairEncoder(tokenizer, fmt(24, query_max_len=6, prompt="Yes?"))
    pair = encoder.encode("a very long query " * 10, "a very long passage " * 50)
    assert pair.query_length == 1 + 6 + len(ids(tokenizer, "\n"))
    assert pair.query_length + pair.passage_length == 24
    assert pair.input_ids[-pair.prompt_length:] == ids(tokenizer, "\n") + ids(tokenizer, "Yes?")


@pytest.mark.parametrize("form", [fmt(24, query_max_len=6, prompt="Yes?"), fmt(32, query_max_len=10),
                                  InputFormat(DEFAULT_PROMPT, 4, 4)])
def test_longest_is_the_longest_pair_the_format_allows(tokenizer, form):
    """``longest`` is checked against the model's position limit: it must be what a pair can reach, not
    more (a format that fits the model exactly was refused for two tokens it can never have)."""
    encoder = PairEncoder(tokenizer, form)
    reached = max(len(encoder.encode(q, p).input_ids) for q in ("q", "a very long query " * 20)
                  for p in ("p", "a very long passage " * 50))
    assert encoder.longest == reached == form.max_length + len(ids(tokenizer, "\n") + ids(tokenizer, form.prompt))


def reference_encoding(tokenizer, form, query, passage):
    """The layout written out from per-text tokenizer calls (what a batched encoder must equal)."""
    head = [tokenizer.bos_token_id] + ids(tokenizer, f"A: {query}")[: form.query_max_len] + ids(tokenizer, "\n")
    room = form.max_length - len(head)
    body = ids(tokenizer, f"B: {passage}")[: min(form.passage_max_len, room)]
    return head + body + ids(tokenizer, "\n") + ids(tokenizer, form.prompt)


PAIRS = [("what causes colds?", "Rhinoviruses do."), ("what causes colds?", "a very long passage " * 40),
         ("q", ""), ("a very long query " * 20, "short"), ("what causes colds?", "Rhinoviruses do.")]


def test_batched_encoding_equals_the_per_pair_layout(tokenizer, tmp_path):
    from matryoshka_reranker.serving.tokenizer import ServingTokenizer

    form = fmt(32, query_max_len=10)
    expected = [reference_encoding(tokenizer, form, q, p) for q, p in PAIRS]
    assert [e.input_ids for e in PairEncoder(tokenizer, form).encode_many(PAIRS)] == expected
    # the serving side (tokenizers only) batches through encode_batch: same ids
    tokenizer.save_pretrained(tmp_path)
    serving = ServingTokenizer(tmp_path / "tokenizer.json", tokenizer.bos_token_id, tokenizer.eos_token_id,
                               tokenizer.pad_token_id)
    assert [e.input_ids for e in PairEncoder(serving, form).encode_many(PAIRS)] == expected
    assert PairEncoder(tokenizer, form).encode_many([]) == []


def test_collate_right_pads(tokenizer):
    encoder = PairEncoder(tokenizer, fmt(64))
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


def test_collate_numpy_matches_torch(tokenizer):
    encoder = PairEncoder(tokenizer, fmt(64))
    pairs = [encoder.encode("q", "short"), encoder.encode("longer query", "a longer passage here")]
    arrays, tensors = encoder.collate_numpy(pairs), encoder.collate(pairs)
    assert set(arrays) == set(tensors)
    for name in arrays:
        assert arrays[name].dtype.name == "int64" and arrays[name].tolist() == tensors[name].tolist()


def test_format_round_trips_through_a_folder(tmp_path):
    original = InputFormat("Relevant?", 16, 48)
    assert InputFormat.load(tmp_path) is None  # a raw checkpoint carries none
    original.save(tmp_path)
    assert (tmp_path / FORMAT_FILE).exists() and InputFormat.load(tmp_path) == original


def test_resolve_format_agrees_or_refuses(tmp_path):
    a, b, raw = tmp_path / "a", tmp_path / "b", tmp_path / "raw"
    for folder in (a, b, raw):
        folder.mkdir()
    InputFormat("P", 16, 48).save(a)
    assert resolve_format([raw, a]) == InputFormat("P", 16, 48)  # saved wins over defaults
    assert resolve_format([raw]) == InputFormat()
    assert resolve_format([raw], InputFormat("Q", 8, 8)) == InputFormat("Q", 8, 8)
    InputFormat("P", 16, 64).save(b)
    with pytest.raises(InputFormatError, match="passage_max_len: 64 vs 48"):
        resolve_format([a, b])
    with pytest.raises(InputFormatError, match="trained with a different input format than requested"):
        resolve_format([a], InputFormat("P", 16, 96))


@pytest.mark.parametrize("bad", [dict(prompt=""), dict(query_max_len=2), dict(passage_max_len=True)])
def test_bad_formats_are_refused(bad):
    with pytest.raises(InputFormatError):
        InputFormat(**{**dict(prompt="P", query_max_len=16, passage_max_len=48), **bad})


def test_newer_format_file_is_refused(tmp_path):
    (tmp_path / FORMAT_FILE).write_text('{"format_version": 99, "prompt": "P", "query_max_len": 8, "passage_max_len": 8}')
    with pytest.raises(InputFormatError, match="newer"):
        InputFormat.load(tmp_path)


def test_pair_list_accepts_flagembedding_shapes():
    assert as_pair_list(("q", "p")) == ([("q", "p")], True)
    assert as_pair_list(["q", "p"]) == ([["q", "p"]], True)  # FlagEmbedding: a 2-list of strings is one pair
    assert as_pair_list([("q", "p"), ("q", "r")])[1] is False
