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


def _beir(folder, corpus: bytes, queries: bytes = b'{"_id": "q1", "text": "what causes colds"}\n'):
    (folder / "corpus.jsonl").write_bytes(corpus)
    (folder / "queries.jsonl").write_bytes(queries)
    return folder


DOC = b'{"_id": "d1", "title": "Colds", "text": "Rhinoviruses cause most colds."}\n'


@pytest.mark.parametrize(
    "corpus, queries, match",
    [
        (DOC + b'{"_id": "d2", "text": "caf\xe9 au lait"}\n', None, r"corpus.jsonl:2: not UTF-8"),
        (DOC + b'{"_id": "d2", "text": "Berlin \\ud83d is in Germany."}\n', None, r"corpus.jsonl:2: .*lone surrogate"),
        (DOC + b'{"_id": "d2", "text": 2019}\n', None, r"corpus.jsonl:2: 'text' must be a string"),
        (DOC + b'{"_id": "d2", "title": ["a"], "text": "x"}\n', None, r"corpus.jsonl:2: 'title' must be a string"),
        (DOC + b'\n{"_id": "d1", "text": "Another document."}\n', None, r"corpus.jsonl:3: '_id' 'd1' repeats .*corpus.jsonl:1"),
        (DOC + b'{"_id": null, "text": "x"}\n', None, r"corpus.jsonl:2: '_id' must be a string or an integer"),
        (DOC, b'{"_id": "q1", "query": "what causes colds"}\n', r"queries.jsonl:1: 'text' must be a string, got nothing"),
        (DOC, b'{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n', r"queries.jsonl:2: '_id' 'q1' repeats"),
    ],
    ids=["not-utf8", "lone-surrogate", "text-number", "title-list", "duplicate-id", "null-id", "query-without-text",
         "duplicate-query-id"],
)
def test_bad_beir_lines_name_file_and_line(tmp_path, corpus, queries, match):
    """Each is an InputError naming file:line (was a bare codec error, an AttributeError / KeyError traceback,
    or silently the last of two texts for one id)."""
    from matryoshka_reranker.core.errors import InputError

    folder = _beir(tmp_path, corpus, *([queries] if queries else []))
    with pytest.raises(InputError, match=match):
        load_corpus(folder)
        load_queries(folder)


def test_good_beir_variants_load(tmp_path):
    """A repeated identical line, blank lines, CRLF, no final newline, int ids and a null title are fine."""
    folder = _beir(tmp_path, DOC + b"\r\n" + DOC.replace(b"\n", b"\r\n") + b'{"_id": 7, "title": null, "text": "x y"}',
                   b'{"_id": 1, "text": "colds"}')
    assert load_corpus(folder) == {"d1": "Colds. Rhinoviruses cause most colds.", "7": "x y"}
    assert load_queries(folder) == {"1": "colds"}


def test_a_non_integer_qrels_score_says_so(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1.0\n")
    with pytest.raises(ValueError, match="test.tsv:2: .*an integer score"):
        load_qrels(tmp_path, "test")


@pytest.mark.parametrize("content, match", [
    (lambda good: good[: len(good) // 2], r"corpus.jsonl.gz.*(cut short|truncated|ended)"),
    (lambda good: b'{"_id": "d1", "text": "not gzipped"}\n', r"corpus.jsonl.gz.*not a valid gzip"),
], ids=["truncated", "not-gzip"])
def test_a_broken_gz_file_is_an_input_error_naming_it(tmp_path, content, match):
    """A truncated download or a plain file named .gz was a bare EOFError (the CLI printed only "Aborted.")
    or a BadGzipFile traceback."""
    import gzip

    from matryoshka_reranker.core.errors import InputError

    good = gzip.compress(DOC * 200)
    (tmp_path / "corpus.jsonl.gz").write_bytes(content(good))
    with pytest.raises(InputError, match=match):
        load_corpus(tmp_path)


def test_a_qrels_line_that_is_not_utf8_names_file_and_line(tmp_path):
    """Was a bare "'utf-8' codec can't decode byte" naming neither the file nor the line."""
    from matryoshka_reranker.core.errors import InputError

    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\tcaf\xe9\t1\n")
    with pytest.raises(InputError, match=r"test.tsv:3: not UTF-8"):
        load_qrels(tmp_path, "test")
