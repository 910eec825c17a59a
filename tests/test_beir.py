"""BEIR loaders on the embedded SciFact copy."""

from pathlib import Path

import pytest

from matryoshka_reranker.pipeline.beir import load_corpus, load_qrels, load_queries

SCIFACT = Path(__file__).resolve().parents[1] / "data" / "scifact"


def test_scifact_counts_match_its_readme():
    assert len(load_corpus(SCIFACT)) == 5183
    queries = load_queries(SCIFACT)
    assert len(queries) == 1109 and all(isinstance(v, str) for v in queries.values())
    train, test = load_qrels(SCIFACT, "train"), load_qrels(SCIFACT, "test")
    assert (len(train), len(test)) == (809, 300)
    assert not set(train) & set(test)


def test_bad_qrels_are_reported(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t2\n")
    with pytest.raises(ValueError, match="test.tsv:2"):
        load_qrels(tmp_path, "test")
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path)
