"""The Great Expectations suite over training JSONL: good data pass, each kind of bad data fails the right check."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from matryoshka_reranker.cli import app
from matryoshka_reranker.config import ValidationParams
from matryoshka_reranker.model.inputs import DEFAULT_PROMPT
from matryoshka_reranker.pipeline.validation import validate_training_data

GOOD = [
    {"query": "what causes the common cold?", "pos": ["Rhinoviruses cause most colds in adults."],
     "neg": ["Paris is the capital of France.", "Vitamin D deficiency is linked to bone loss."]},
    {"query": "capital of France", "pos": ["Paris is the capital of France."],
     "neg": ["Berlin is the capital of Germany.", "Rome is in Italy, not in France."]},
    {"query": "where is ATP made?", "pos": ["ATP synthesis happens in the inner mitochondrial membrane."],
     "neg": ["Stem cells differentiate in vitro.", "Sunlight helps the skin make vitamin D."], "prompt": DEFAULT_PROMPT},
    {"query": "vitamin D and bones", "pos": ["Vitamin D deficiency is linked to bone loss."],
     "neg": ["Rhinoviruses cause most colds in adults.", "Paris is the capital of France."]},
]


def scored(rows):
    return [{**r, "pos_scores": [0.9] * len(r["pos"]), "neg_scores": [0.1 * i for i in range(len(r["neg"]))]}
            for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def edit(index, **changes):
    rows = scored(GOOD)
    rows[index] = {k: v for k, v in {**rows[index], **changes}.items() if v is not DROP}
    return rows


DROP = object()


def test_good_data_pass_and_report_is_written(tmp_path):
    data = write_jsonl(tmp_path / "groups.jsonl", GOOD)
    report = validate_training_data(data, tmp_path / "report")
    assert report.success and report.rows == 4 and not report.failed
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"index.html", "summary.json", "summary.md", "static", "validations", "expectations"} <= files
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["success"] is True and len(summary["checks"]) == len(report.checks)
    # Data Docs point at their bundled images, not at GX's servers with the context id.
    pages = list((tmp_path / "report").rglob("*.html"))
    assert len(pages) >= 3
    assert not any("dataContextId" in p.read_text() or "web-assets" in p.read_text() for p in pages)
    assert "validations/training_data" in (tmp_path / "report" / "index.html").read_text()


def test_scored_data_pass_when_scores_are_required(tmp_path):
    data = write_jsonl(tmp_path / "scored.jsonl", scored(GOOD))
    assert validate_training_data(data, require_scores=True).success


@pytest.mark.parametrize(
    "rows, failed, expectation, bad_line",
    [
        (edit(1, neg=[], neg_scores=[]), "neg_not_empty", "expect_column_values_to_be_between", 2),
        (edit(0, pos=[], pos_scores=[]), "pos_not_empty", "expect_column_values_to_be_between", 1),
        (edit(2, pos_scores=[0.9, 0.8]), "pos_scores_aligned", "expect_column_values_to_be_in_set", 3),
        (edit(3, neg_scores=[0.1, math.nan]), "neg_scores_finite", "expect_column_values_to_be_in_set", 4),
        (edit(1, neg=["Paris is the capital of France.", "Rome is in Italy, not in France."]),
         "positive_not_in_negatives", "expect_column_values_to_be_in_set", 2),
        (edit(2, neg=DROP, neg_scores=DROP), "neg_is_string_list", "expect_column_values_to_be_in_set", 3),
        (edit(0, query=DROP), "query_is_string", "expect_column_values_to_be_in_set", 1),
        (edit(0, query=42), "query_is_string", "expect_column_values_to_be_in_set", 1),
        (edit(1, pos=["fine passage here", 7]), "pos_is_string_list", "expect_column_values_to_be_in_set", 2),
        (edit(3, query="x" * 1001), "query_length", "expect_column_values_to_be_between", 4),
        (edit(3, neg=["too short", "Paris is the capital of France."]), "passage_min_length",
         "expect_column_values_to_be_between", 4),
        (edit(0, prompt=["not", "a", "string"]), "prompt_is_string", "expect_column_values_to_be_in_set", 1),
        (edit(1, prompt="Relevant?"), "prompt_matches_model", "expect_column_values_to_be_in_set", 2),
        (edit(2, pos_scores="high"), "pos_scores_type", "expect_column_values_to_be_in_set", 3),
        (scored(GOOD)[:2] + ['{"query": "broken", "pos": [\n'] + scored(GOOD)[2:], "json_object",
         "expect_column_values_to_be_null", 3),
        (scored(GOOD) + ["[1, 2, 3]\n"], "json_object", "expect_column_values_to_be_null", 5),
        (scored(GOOD) + [scored(GOOD)[0]], "duplicate_rate", "expect_column_values_to_be_in_set", 5),
        # a lone surrogate escape is valid JSON but no tokenizer takes it: teacher_score would fail on it
        (edit(1, neg=["Berlin is the capital \ud83d of Germany.", "Rome is in Italy."]), "json_object",
         "expect_column_values_to_be_null", 2),
        # lines training refuses (parse_example) must fail here, not at teacher_score
        (edit(2, query="     "), "query_not_blank", "expect_column_values_to_be_in_set", 3),
        (edit(1, neg_scores=DROP), "scores_paired", "expect_column_values_to_be_in_set", 2),
        (edit(3, neg_ids=["d1"]), "neg_ids_aligned", "expect_column_values_to_be_in_set", 4),
    ],
    ids=["empty-neg", "empty-pos", "misaligned-scores", "nan-score", "positive-in-negatives", "missing-neg",
         "missing-query", "query-not-string", "pos-mixed-types", "query-too-long", "passage-too-short",
         "prompt-not-string", "prompt-not-model-prompt", "scores-not-list", "malformed-json", "not-an-object", "duplicates",
         "lone-surrogate", "blank-query", "scores-one-side", "ids-misaligned"],
)
def test_each_kind_of_bad_data_fails_its_check(tmp_path, rows, failed, expectation, bad_line):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    report = validate_training_data(data, bounds=ValidationParams(max_duplicate_fraction=0.1), prompt=DEFAULT_PROMPT)
    assert not report.success
    assert [c.name for c in report.failed] == [failed]  # exactly that check: a bad row is reported once
    check = report.failed[0]
    assert check.expectation == expectation
    assert check.unexpected_count == 1 and check.sample_lines == [bad_line]
    assert check.sample_rows and check.sample_rows[0].startswith(f"{data}:{bad_line}: ")


def test_null_score_lists_count_as_absent_as_training_reads_them(tmp_path):
    rows = [{**row, "pos_scores": None, "neg_scores": None} for row in GOOD]
    report = validate_training_data(write_jsonl(tmp_path / "null.jsonl", rows), bounds=ValidationParams(),
                                    prompt=DEFAULT_PROMPT)
    assert report.success, report.failed
    report = validate_training_data(write_jsonl(tmp_path / "null.jsonl", rows), bounds=ValidationParams(),
                                    prompt=DEFAULT_PROMPT, require_scores=True)
    assert {c.name for c in report.failed} == {"pos_scores_type", "neg_scores_type"}


def test_scores_required_after_teacher_scoring(tmp_path):
    data = write_jsonl(tmp_path / "groups.jsonl", GOOD)
    report = validate_training_data(data, require_scores=True)
    assert {c.name for c in report.failed} == {"pos_scores_type", "neg_scores_type"}
    assert report.failed[0].unexpected_count == 4 and report.failed[0].sample_values[0] == "missing"


def test_duplicate_rate_is_a_bound(tmp_path):
    rows = GOOD + [GOOD[0]]  # 1 repeat in 5 lines = 20%
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    assert validate_training_data(data, bounds=ValidationParams(max_duplicate_fraction=0.25)).success
    failed = validate_training_data(data, bounds=ValidationParams(max_duplicate_fraction=0.1)).failed
    assert [c.name for c in failed] == ["duplicate_rate"]


def test_empty_file_fails_row_count(tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", ["\n"])
    report = validate_training_data(data)
    assert [c.name for c in report.failed] == ["row_count"] and report.failed[0].observed_value == 0


def test_cli_exit_codes_and_report(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    bad = write_jsonl(tmp_path / "bad.jsonl", edit(1, neg=[], neg_scores=[]) + ['{"query": "x",\n'])
    report = tmp_path / "report"
    runner = CliRunner()

    ok = runner.invoke(app, ["validate", "-p", str(params), "--input", str(good), "--report", str(report)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((report / "summary.json").read_text())["success"] is True

    failed = runner.invoke(app, ["validate", "-p", str(params), "--input", str(bad),
                                 "-S", f"paths.validation_report={report}"])
    assert failed.exit_code == 1
    assert "neg_not_empty" in failed.output and "json_object" in failed.output and "lines [5]" in failed.output
    summary = json.loads((report / "summary.json").read_text())  # the failure report replaced the old one
    assert summary["success"] is False and {c["name"] for c in summary["checks"] if not c["success"]} == {
        "neg_not_empty", "json_object"}
    assert "## neg_not_empty" in (report / "summary.md").read_text()
    # The stage writes its report folder and nothing else.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "params.yaml", "report"]

    missing = runner.invoke(app, ["validate", "-p", str(params), "--input", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad_params = runner.invoke(app, ["validate", "-p", str(params), "-S", "validation.min_query_chars=-1"])
    assert bad_params.exit_code == 2 and "validation.min_query_chars" in bad_params.output


def test_bounds_are_checked_when_params_load():
    from matryoshka_reranker.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match="min_query_chars .* > max_query_chars"):
        parse_params({"validation": {"min_query_chars": 50, "max_query_chars": 10}})
    with pytest.raises(ParamsError, match="validation.max_duplicate_fraction"):
        parse_params({"validation": {"max_duplicate_fraction": 1.5}})


def test_an_expectation_that_crashes_is_a_failure_with_its_message(tmp_path):
    from matryoshka_reranker.pipeline.validation import Check, read_rows, run_suite

    rows = read_rows(write_jsonl(tmp_path / "groups.jsonl", GOOD))
    [result] = run_suite(rows, [Check("bogus", "ExpectColumnValuesToBeBetween", {"column": "nope", "min_value": 1}, "x")])
    assert not result.success and "GX error" in result.observed_value and "nope" in result.observed_value
