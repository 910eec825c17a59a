"""prepare: BM25 negatives skip judged documents, eval candidates, determinism, user files."""

from __future__ import annotations

import json

import pytest

from matryoshka_reranker.pipeline.prepare import prepare
from tests.train_fixtures import (
    CORPUS,
    TRAIN_ROWS,
    one_thread,  # noqa: F401  (autouse)
    tiny_params,
    write_beir,
    write_jsonl,
)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_bm25_groups_skip_judged_documents_and_are_deterministic(tmp_path):
    write_beir(tmp_path / "beir")
    params = tiny_params(tmp_path, tmp_path)
    summary = prepare(params)
    assert (summary.train_groups, summary.eval_queries, summary.source) == (3, 2, "bm25")
    groups = {g["query_id"]: g for g in read(params.paths.train_groups)}
    q1 = groups["q1"]
    assert sorted(q1["pos_ids"]) == ["d1", "d2"]
    assert len(q1["neg_ids"]) == 2 and not {"d1", "d2", "d7"} & set(q1["neg_ids"])  # d7 judged 0: not a negative
    assert q1["pos"] == [f"{CORPUS[d][0]}. {CORPUS[d][1]}" if CORPUS[d][0] else CORPUS[d][1] for d in q1["pos_ids"]]
    assert groups["q2"]["neg_ids"][0] == "d4"  # "capital of" ranks Berlin right after the judged Paris
    first = open(params.paths.train_groups).read(), open(params.paths.eval_candidates).read()
    prepare(params)
    assert (open(params.paths.train_groups).read(), open(params.paths.eval_candidates).read()) == first


def test_eval_candidates_are_bm25_top_k_of_test_queries(tmp_path):
    write_beir(tmp_path / "beir")
    params = tiny_params(tmp_path, tmp_path)
    prepare(params)
    rows = {r["query_id"]: r for r in read(params.paths.eval_candidates)}
    assert set(rows) == {"q4", "q5"}  # test split only
    q4 = rows["q4"]
    assert q4["query"] == "cold rhinoviruses winter" and len(q4["candidates"]) == 3
    assert q4["candidates"][0]["doc_id"] == "d7"
    scores = [c["bm25"] for c in q4["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert all(set(c) == {"doc_id", "text", "bm25"} for c in q4["candidates"])


def test_query_subsets_are_seeded(tmp_path):
    write_beir(tmp_path / "beir")
    params = tiny_params(tmp_path, tmp_path, data__train_queries=2, data__eval_queries=1)
    prepare(params)
    ids = [g["query_id"] for g in read(params.paths.train_groups)]
    assert len(ids) == 2
    prepare(params)
    assert [g["query_id"] for g in read(params.paths.train_groups)] == ids


def test_user_training_file_is_copied_as_the_training_groups(tmp_path, caplog):
    from tests.train_fixtures import QUERIES

    write_beir(tmp_path / "beir")
    own = write_jsonl(tmp_path / "own.jsonl", TRAIN_ROWS)
    params = tiny_params(tmp_path, tmp_path, data__train_file=str(own))
    assert prepare(params).source == str(own)
    assert "also in the training file" not in caplog.text
    leaky = write_jsonl(tmp_path / "leaky.jsonl", TRAIN_ROWS + [{**TRAIN_ROWS[0], "query": "  " + QUERIES["q5"].upper()}])
    prepare(tiny_params(tmp_path, tmp_path, data__train_file=str(leaky)))  # an eval query, trained on: said
    assert "1 of 2 eval queries are also in the training file" in caplog.text
    prepare(params)
    assert open(params.paths.train_groups).read() == own.read_text()
    # A bad file is copied as is: the validate stage reports every bad line at once (tests/test_pipeline.py).
    bad = write_jsonl(tmp_path / "bad.jsonl", [TRAIN_ROWS[0], {"query": "q", "pos": ["p"], "neg": []}])
    assert prepare(tiny_params(tmp_path, tmp_path, data__train_file=str(bad))).train_groups == 2
    with pytest.raises(FileNotFoundError, match="data.train_file"):
        prepare(tiny_params(tmp_path, tmp_path, data__train_file=str(tmp_path / "missing.jsonl")))
    assert open(params.paths.train_groups).read() == bad.read_text()  # the last output stays


def test_mined_negatives_pass_validation_with_copies_and_odd_lengths_in_the_corpus(tmp_path):
    """An unjudged copy of a positive's text (same BM25 score: it would be mined right after it) and a
    passage outside the validation bounds are not mined: prepare's output passes its own `validate`."""
    import gzip

    from matryoshka_reranker.pipeline.validation import validate_training_data

    beir = write_beir(tmp_path / "beir")
    with gzip.open(beir / "corpus.jsonl.gz", "at") as handle:
        handle.write(json.dumps({"_id": "d8", "title": "France", "text": "Paris is the capital of France."}) + "\n")
        handle.write(json.dumps({"_id": "d9", "title": "", "text": "Paris?"}) + "\n")  # 6 characters < 10
    # judged positives and queries out of bounds too: a short positive of q2, a query of 1,001 characters
    with open(beir / "qrels" / "train.tsv", "a") as handle:
        handle.write("q2\td9\t1\nq9\td4\t1\n")
    with open(beir / "queries.jsonl", "a") as handle:
        handle.write(json.dumps({"_id": "q9", "text": "x" * 1001}) + "\n")
    params = tiny_params(tmp_path, tmp_path)
    prepare(params)
    groups = {g["query_id"]: g for g in read(params.paths.train_groups)}
    assert groups["q2"]["neg_ids"] and not {"d8", "d9"} & set(groups["q2"]["neg_ids"])
    assert groups["q2"]["pos_ids"] == ["d3"] and "q9" not in groups  # left out, not handed to `validate`
    assert all(len(set(g["neg"])) == len(g["neg"]) and not set(g["pos"]) & set(g["neg"]) for g in groups.values())
    report = validate_training_data(params.paths.train_groups, bounds=params.validation, prompt=params.model.prompt)
    assert report.success, report.failed


@pytest.mark.parametrize(
    "split, qrels, match",
    [
        ("test", "query-id\tcorpus-id\tscore\n4\td7\t1\n5\td6\t1\n", r"test.tsv: none of its 2 judged query ids is in queries"),
        ("test", "query-id\tcorpus-id\tscore\nq4\t7\t1\nq5\t6\t1\n", r"test.tsv: none of its relevant document ids is in the corpus"),
        ("train", "query-id\tcorpus-id\tscore\n1\td1\t1\n", r"train.tsv: none of its 1 judged query ids"),
        ("test", "query-id\tcorpus-id\tscore\nq4\td7\t0\n", r"test.tsv: no positive judgement"),
    ],
    ids=["query-ids-do-not-match", "doc-ids-do-not-match", "train-query-ids", "no-positive"],
)
def test_qrels_that_match_nothing_are_refused_and_the_last_outputs_stay(tmp_path, split, qrels, match):
    """Ids that do not match ("q4" vs "4") were a bare unpacking error (no query left), or, for document ids,
    eval candidates with nothing relevant written as if fine."""
    from matryoshka_reranker.core.errors import InputError

    beir = write_beir(tmp_path / "beir")
    params = tiny_params(tmp_path, tmp_path)
    prepare(params)
    before = open(params.paths.train_groups).read(), open(params.paths.eval_candidates).read()
    (beir / "qrels" / f"{split}.tsv").write_text(qrels)
    with pytest.raises(InputError, match=match):
        prepare(params)
    assert (open(params.paths.train_groups).read(), open(params.paths.eval_candidates).read()) == before


def test_an_empty_corpus_is_refused(tmp_path):
    from matryoshka_reranker.core.errors import InputError

    beir = write_beir(tmp_path / "beir")
    (beir / "corpus.jsonl.gz").unlink()
    (beir / "corpus.jsonl").write_text("\n")
    with pytest.raises(InputError, match="the corpus holds no document"):  # was "max() arg is an empty sequence"
        prepare(tiny_params(tmp_path, tmp_path))


def test_settings_that_do_not_fit_the_models_depth_fail_before_any_data_work(tmp_path):
    """A user's 24-layer model with the default exits [8, 16, 24, 30]: refused by prepare from its config.json,
    naming the keys, before BM25 indexing (the data folder does not even exist here), not at self_distill."""
    from matryoshka_reranker.core.errors import InputError

    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 24}))
    params = tiny_params(tmp_path, model, export__exit_layers=[8, 16, 24, 30], specialist__exits=[24],
                         model__start_layer=4)
    with pytest.raises(InputError, match=r"\(24 layers\): export.exit_layers \[30\].*specialist.exits \[24\]"):
        prepare(params)  # an InputError about depth, not the missing data folder's FileNotFoundError: checked first
    # a saved Matryoshka model keeps its own layer layout, which training refuses to change: said here too
    (model / "matryoshka.json").write_text(json.dumps({"start_layer": 2, "layer_sep": 1}))
    with pytest.raises(InputError, match=r"model.start_layer 4: the saved Matryoshka model was trained with 2"):
        prepare(tiny_params(tmp_path, model, export__exit_layers=[8, 16, 24], model__start_layer=4))


@pytest.mark.parametrize("missing", ["train", "test"])
def test_a_missing_split_is_named_before_indexing(tmp_path, missing):
    """Most BEIR sets ship only qrels/test.tsv: the missing split is named with the key to change (and, for
    training, data.train_file), before the corpus is indexed."""
    beir = write_beir(tmp_path / "beir")
    (beir / "qrels" / f"{missing}.tsv").unlink()
    key = "data.train_split" if missing == "train" else "data.eval_split"
    with pytest.raises(FileNotFoundError, match=rf"{key}: no qrels file .*{missing}.tsv \(splits here: "
                                                 rf"{'test' if missing == 'train' else 'train'}\)"
                                                 + ("; without a train split.*data.train_file" if missing == "train" else "")):
        prepare(tiny_params(tmp_path, tmp_path))


def test_a_gzipped_training_file_is_refused_by_name(tmp_path):
    from matryoshka_reranker.core.errors import InputError

    write_beir(tmp_path / "beir")
    (tmp_path / "mine.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="data.train_file: .*mine.jsonl.gz is gzipped; decompress it"):
        prepare(tiny_params(tmp_path, tmp_path, data__train_file=str(tmp_path / "mine.jsonl.gz")))
