"""Training data: strict loader (errors name file:line), group sampling, collation."""

from __future__ import annotations

import json

import pytest
import torch

from matryoshka_reranker.core.errors import InputError
from matryoshka_reranker.model.inputs import DEFAULT_PROMPT, InputFormat, PairEncoder
from matryoshka_reranker.training.data import (
    GroupCollator,
    GroupDataset,
    TrainingDataError,
    load_training_file,
)
from tests.train_fixtures import TRAIN_ROWS, one_thread, write_jsonl  # noqa: F401  (autouse)

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}


@pytest.mark.parametrize("bad, message", [
    ({"pos": ["p"], "neg": ["n"]}, "missing field 'query'"),
    ({"query": "q", "neg": ["n"]}, "missing field 'pos'"),
    ({"query": "q", "pos": ["p"], "neg": []}, "'neg' is empty"),
    ({"query": "q", "pos": "p", "neg": ["n"]}, "'pos' must be a list of strings"),
    ({"query": 3, "pos": ["p"], "neg": ["n"]}, "'query' must be a non-empty string"),
    ({**GOOD, "pos_scores": [1.0], "neg_scores": [1.0]}, "'neg_scores' has 1 scores but 'neg' has 2"),
    ({**GOOD, "pos_scores": [float("nan")], "neg_scores": [1.0, 2.0]}, "non-finite"),
    ({**GOOD, "pos_scores": [1.0]}, "both 'pos_scores' and 'neg_scores'"),
    ({**GOOD, "pos_scores": ["1"], "neg_scores": [1.0, 2.0]}, "list of numbers"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(TrainingDataError, match=rf"train\.jsonl:3: .*{message}"):
        load_training_file(path)


def test_invalid_json_and_missing_scores_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(InputError, match=r"train\.jsonl:2: not valid JSON"):
        load_training_file(path)
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(TrainingDataError, match=r"train\.jsonl:1: no 'pos_scores'.*teacher-score"):
        load_training_file(path, require_scores=True)
    path.write_text("\n")
    with pytest.raises(TrainingDataError, match="no training examples"):
        load_training_file(path)


def test_per_line_prompt_must_be_the_model_prompt(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({**GOOD, "prompt": DEFAULT_PROMPT}) + "\n" + json.dumps({**GOOD, "prompt": "Relevant?"}) + "\n")
    with pytest.raises(TrainingDataError, match=r"train\.jsonl:2: per-line prompt 'Relevant\?' differs from model.prompt"):
        load_training_file(path, prompt=DEFAULT_PROMPT)
    assert len(load_training_file(path)) == 2  # without a format to enforce, lines load as they are


def test_groups_put_the_positive_first_with_aligned_scores(tmp_path, caplog):
    examples = load_training_file(write_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS))
    with caplog.at_level("WARNING"):
        dataset = GroupDataset(examples, group_size=3, seed=1)
    assert "negatives" not in caplog.text  # enough negatives everywhere: no warning
    group = dataset[0]
    row = TRAIN_ROWS[0]
    assert group.passages[0] == row["pos"][0] and len(group.passages) == 3
    assert len(set(group.passages[1:])) == 2  # enough negatives: sampled without replacement
    score_of = dict(zip(row["neg"], row["neg_scores"]))
    assert group.teacher_scores == [5.0] + [score_of[p] for p in group.passages[1:]]
    assert dataset[0] == group  # deterministic in (seed, epoch, index)
    with caplog.at_level("WARNING"):
        big = GroupDataset(examples, group_size=6, seed=1)[1]  # 2 negatives for 5 slots: with replacement
    assert "fewer than train_group_size - 1 = 5 negatives" in caplog.text  # said, not silent
    assert len(big.passages) == 6 and set(big.passages[1:]) <= set(TRAIN_ROWS[1]["neg"])
    epochs = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        epochs.add(tuple(dataset[0].passages))
    assert len(epochs) > 1


def test_collator_shapes_and_right_padding(tmp_path, tokenizer):
    examples = load_training_file(write_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS))
    dataset = GroupDataset(examples, group_size=3)
    encoder = PairEncoder(tokenizer, InputFormat(query_max_len=12, passage_max_len=28))
    batch = GroupCollator(encoder)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 6 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["teacher_scores"].shape == (2, 3) and batch["teacher_scores"].dtype == torch.float32
    first = encoder.encode(dataset[0].query, dataset[0].passages[0])
    assert batch["input_ids"][0, : len(first.input_ids)].tolist() == first.input_ids
    assert batch["query_lengths"][0] == first.query_length and batch["prompt_lengths"][0] == first.prompt_length
    mask = batch["attention_mask"]
    assert torch.all(mask[:, :-1] >= mask[:, 1:])  # right padding: ones then zeros
    unscored = [dict(r) for r in TRAIN_ROWS]
    for row in unscored:
        row.pop("pos_scores"), row.pop("neg_scores")
    plain = GroupDataset(load_training_file(write_jsonl(tmp_path / "u.jsonl", unscored)), 3)
    assert "teacher_scores" not in GroupCollator(encoder)([plain[0]])
