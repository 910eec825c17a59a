"""Great Expectations suite over FlagEmbedding-format training data: bad data stops the pipeline here.

GX checks scalar columns, and its value-length check passes silently on empty lists, so every JSONL
line becomes one row of derived columns: a type tag per field (``"list[str]"``, ``"missing"``, ...),
counts, character lengths, and alignment / finiteness / overlap flags. Map expectations skip nulls;
here a derived column is null only on rows another expectation already fails (a line that is not a
JSON object has null tags; a field of the wrong type has null counts), so no bad row goes unseen.

>>> report = validate_training_data("data/derived/train_groups.jsonl", "reports/validation")
>>> report.success, [c.name for c in report.failed]

``import great_expectations`` costs 5-9 s, so it happens inside ``run_suite`` only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ValidationParams
from ..core.atomic import atomic_dir
from ..core.jsonl import is_valid_unicode

log = logging.getLogger(__name__)

PASSAGE_FIELDS = ("pos", "neg")
SCORE_FIELDS = {"pos_scores": "pos", "neg_scores": "neg"}
_MISSING = object()


@dataclass(frozen=True)
class Check:
    """One expectation of the suite: a stable name, the GX expectation class, its arguments, and why."""

    name: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: dict[str, Any]
    description: str


@dataclass
class CheckResult:
    name: str
    expectation: str  # GX snake_case type, e.g. expect_column_values_to_be_in_set
    column: str | None
    description: str
    success: bool
    unexpected_count: int = 0
    element_count: int = 0
    unexpected_percent: float = 0.0
    observed_value: Any = None
    sample_lines: list[int] = field(default_factory=list)
    sample_values: list[Any] = field(default_factory=list)
    sample_rows: list[str] = field(default_factory=list)  # the offending JSONL lines, truncated


@dataclass
class ValidationReport:
    input: str
    require_scores: bool
    rows: int
    success: bool
    checks: list[CheckResult]
    report_dir: str | None = None

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": 1, **{k: v for k, v in asdict(self).items() if k != "report_dir"}}


# ---------------------------------------------------------------------------------------------------
# JSONL -> derived rows


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_tag(value: Any, item: str | None = None) -> str:
    """``"missing"``, a JSON type name, or ``"list[str]"`` / ``"list[number]"`` when every item fits."""
    if value is _MISSING:
        return "missing"
    if isinstance(value, list) and item is not None:
        fits = all(isinstance(x, str) for x in value) if item == "str" else all(_is_number(x) for x in value)
        return f"list[{item}]" if fits else "list[mixed]"
    return _json_type(value)


def derive_row(line: int, text: str, prompt: str | None = None) -> dict[str, Any]:
    """One JSONL line -> the scalar columns the suite checks (see the module docstring)."""
    row: dict[str, Any] = {"line": line, "json_error": None}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        row["json_error"] = f"not valid JSON: {err.msg} (column {err.colno})"
        return row
    if not isinstance(obj, dict):
        row["json_error"] = f"a JSON {_json_type(obj)}, not an object"
        return row
    if "\\u" in text:  # JSON may escape a lone surrogate ("\ud800"): no tokenizer takes it, so training would fail
        if not is_valid_unicode(obj):
            row["json_error"] = "not valid Unicode (a lone surrogate escape)"
            return row

    query = obj.get("query", _MISSING)
    row["query_type"] = _type_tag(query)
    row["query_chars"] = len(query) if isinstance(query, str) else None
    row["query_blank"] = None if not isinstance(query, str) else not query.strip()  # "   " passes a length bound
    row["prompt_type"] = _type_tag(obj.get("prompt", _MISSING))
    given = obj.get("prompt")
    row["prompt_matches"] = None if prompt is None or not isinstance(given, str) else given == prompt

    passages: dict[str, list[str] | None] = {}
    for name in PASSAGE_FIELDS:
        value = obj.get(name, _MISSING)
        row[f"{name}_type"] = _type_tag(value, "str")
        passages[name] = value if row[f"{name}_type"] == "list[str]" else None
        row[f"n_{name}"] = None if passages[name] is None else len(passages[name])
    lengths = [len(p) for group in passages.values() if group for p in group]
    row["passage_chars_min"] = min(lengths) if lengths else None
    row["passage_chars_max"] = max(lengths) if lengths else None

    for name, passage_field in SCORE_FIELDS.items():
        value = obj.get(name, _MISSING)
        row[f"{name}_type"] = _type_tag(value, "number")
        scores = value if row[f"{name}_type"] == "list[number]" else None
        row[f"{name}_finite"] = None if scores is None else all(math.isfinite(s) for s in scores)
        group = passages[passage_field]
        row[f"{name}_aligned"] = None if scores is None or group is None else len(scores) == len(group)

    scores_given = [row[f"{name}_type"] not in ("missing", "null") for name in SCORE_FIELDS]
    paired = scores_given[0] == scores_given[1]  # training takes both or neither (one teacher, both sides)
    row["scores_paired"] = None if passages["pos"] is None or passages["neg"] is None else paired  # reported there
    for key, passage_field in (("pos_ids", "pos"), ("neg_ids", "neg")):
        ids, group = obj.get(key), passages[passage_field]
        row[f"{key}_aligned"] = None if ids is None or group is None else isinstance(ids, list) and len(ids) == len(group)
    pos, neg = passages["pos"], passages["neg"]
    row["positive_in_negatives"] = None if pos is None or neg is None else bool(set(pos) & set(neg))
    row["_duplicate_key"] = (query, tuple(sorted(pos))) if isinstance(query, str) and pos is not None else None
    return row


def read_rows(path: str | os.PathLike, prompt: str | None = None) -> list[dict[str, Any]]:
    """Derived rows of every non-blank line; malformed lines become rows that fail ``json_object``."""
    rows, seen = [], {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.append({"line": number, "json_error": f"not UTF-8 ({err.reason} at byte {err.start})"})
                continue
            if not text.strip():
                continue
            row = derive_row(number, text, prompt)
            key = row.pop("_duplicate_key", None)
            row["is_duplicate"] = None if key is None else key in seen
            if key is not None:
                seen.setdefault(key, number)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The suite


def build_checks(bounds: ValidationParams, require_scores: bool) -> list[Check]:
    """The expectations, in report order. ``require_scores``: teacher scores must be present."""
    in_set = "ExpectColumnValuesToBeInSet"
    between = "ExpectColumnValuesToBeBetween"
    score_tags = ["list[number]"] if require_scores else ["list[number]", "missing", "null"]  # null: as absent
    checks = [
        Check("row_count", "ExpectTableRowCountToBeBetween", {"min_value": bounds.min_rows},
              f"the file holds at least {bounds.min_rows} training example(s)"),
        Check("json_object", "ExpectColumnValuesToBeNull", {"column": "json_error"},
              "every line is one JSON object"),
        Check("query_is_string", in_set, {"column": "query_type", "value_set": ["str"]},
              "`query` is present and a string"),
    ]
    for name in PASSAGE_FIELDS:
        checks += [
            Check(f"{name}_is_string_list", in_set, {"column": f"{name}_type", "value_set": ["list[str]"]},
                  f"`{name}` is present and a list of strings"),
            Check(f"{name}_not_empty", between, {"column": f"n_{name}", "min_value": 1},
                  f"`{name}` holds at least one passage"),
        ]
    checks += [
        Check("query_not_blank", in_set, {"column": "query_blank", "value_set": [False]},
              "`query` holds more than white space"),
        Check("query_length", between, {"column": "query_chars", "min_value": bounds.min_query_chars,
                                        "max_value": bounds.max_query_chars},
              f"query length within [{bounds.min_query_chars}, {bounds.max_query_chars}] characters"),
        Check("passage_min_length", between, {"column": "passage_chars_min", "min_value": bounds.min_passage_chars},
              f"every passage has at least {bounds.min_passage_chars} characters"),
        Check("passage_max_length", between, {"column": "passage_chars_max", "max_value": bounds.max_passage_chars},
              f"every passage has at most {bounds.max_passage_chars} characters"),
        Check("prompt_is_string", in_set, {"column": "prompt_type", "value_set": ["str", "missing"]},
              "`prompt`, when given, is a string"),
        Check("prompt_matches_model", in_set, {"column": "prompt_matches", "value_set": [True]},
              "`prompt`, when given, equals model.prompt (a model is served with the one prompt it saves)"),
    ]
    for name, passage_field in SCORE_FIELDS.items():
        presence = "present and a list of numbers" if require_scores else "absent or a list of numbers"
        checks += [
            Check(f"{name}_type", in_set, {"column": f"{name}_type", "value_set": score_tags},
                  f"`{name}` is {presence}"),
            Check(f"{name}_aligned", in_set, {"column": f"{name}_aligned", "value_set": [True]},
                  f"`{name}` has one score per `{passage_field}` passage"),
            Check(f"{name}_finite", in_set, {"column": f"{name}_finite", "value_set": [True]},
                  f"every `{name}` value is finite (no NaN or infinity)"),
        ]
    checks.append(Check("scores_paired", in_set, {"column": "scores_paired", "value_set": [True]},
                        "`pos_scores` and `neg_scores` are given together or not at all"))
    for key, passage_field in (("pos_ids", "pos"), ("neg_ids", "neg")):
        checks.append(Check(f"{key}_aligned", in_set, {"column": f"{key}_aligned", "value_set": [True]},
                            f"`{key}`, when given, is a list with one id per `{passage_field}` passage"))
    duplicate = {"column": "is_duplicate", "value_set": [False]}
    if bounds.max_duplicate_fraction > 0:
        duplicate["mostly"] = 1.0 - bounds.max_duplicate_fraction
    checks += [
        Check("positive_not_in_negatives", in_set, {"column": "positive_in_negatives", "value_set": [False]},
              "no positive passage is also among the line's negatives"),
        Check("duplicate_rate", in_set, duplicate,
              f"at most {bounds.max_duplicate_fraction:.1%} of lines repeat an earlier line's (query, pos)"),
    ]
    return checks


COLUMNS = ["line", "json_error", "query_type", "query_chars", "query_blank", "scores_paired", "pos_ids_aligned",
           "neg_ids_aligned", "prompt_type", "prompt_matches", "pos_type", "n_pos", "neg_type",
           "n_neg", "passage_chars_min", "passage_chars_max", "pos_scores_type", "pos_scores_finite",
           "pos_scores_aligned", "neg_scores_type", "neg_scores_finite", "neg_scores_aligned",
           "positive_in_negatives", "is_duplicate"]


def _import_gx():
    """Great Expectations with its analytics off (its own switch, plus DO_NOT_TRACK)."""
    from ..core.environment import configure

    configure()
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # its INFO records are hundreds of lines of internals
        gx_log.setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def run_suite(rows: list[dict[str, Any]], checks: list[Check], docs_dir: Path | None = None,
              sample_rows: int = 5) -> list[CheckResult]:
    """Validates the derived rows; with ``docs_dir``, also renders Data Docs (HTML) there."""
    gx = _import_gx()
    import great_expectations.expectations as gxe
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("line", "query_chars", "n_pos", "n_neg", "passage_chars_min", "passage_chars_max"):
        frame[column] = frame[column].astype("Int64")  # keep integers integral next to nulls

    workdir = Path(tempfile.mkdtemp(prefix="matryoshka-gx-")) if docs_dir is not None else None
    try:
        if workdir is not None:
            context = gx.get_context(mode="file", project_root_dir=str(workdir))  # Data Docs need files
        else:
            context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.enable_analytics(False)

        suite = gx.ExpectationSuite(name="training_data")
        for check in checks:
            expectation = getattr(gxe, check.expectation)(**check.kwargs, description=check.description,
                                                          meta={"check": check.name})
            suite.add_expectation(expectation)
        suite = context.suites.add(suite)
        batch = (context.data_sources.add_pandas("training_data").add_dataframe_asset("jsonl")
                 .add_batch_definition_whole_dataframe("all_lines"))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name="training_data", data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if workdir is not None else []
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="training_data", validation_definitions=[definition], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": sample_rows,
                           "unexpected_index_column_names": ["line"]}))
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        results = [r for run in outcome.run_results.values() for r in run.results]
        if workdir is not None:
            _copy_data_docs(workdir / "gx" / "uncommitted" / "data_docs" / "local_site", docs_dir)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    by_name = {r.expectation_config.meta["check"]: r for r in results}
    return [_check_result(check, by_name[check.name], sample_rows) for check in checks]


def _check_result(check: Check, result, sample_rows: int) -> CheckResult:
    info = result.result or {}
    indices = info.get("partial_unexpected_index_list") or []
    return CheckResult(
        name=check.name,
        expectation=result.expectation_config.type,
        column=check.kwargs.get("column"),
        description=check.description,
        success=bool(result.success),
        unexpected_count=int(info.get("unexpected_count") or 0),
        element_count=int(info.get("element_count") or 0),
        unexpected_percent=round(float(info.get("unexpected_percent") or 0.0), 4),
        observed_value=_plain(info.get("observed_value")) if _gx_error(result) is None else _gx_error(result),
        sample_lines=[int(i["line"]) for i in indices[:sample_rows]],
        sample_values=[_plain(v) for v in (info.get("partial_unexpected_list") or [])[:sample_rows]],
    )


def _gx_error(result) -> str | None:
    """GX reports an expectation that crashed as a failure with ``exception_info``: surface its message."""
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for entry in entries:
        if entry.get("raised_exception"):
            return f"GX error: {entry.get('exception_message')}"
    return None


def _plain(value: Any) -> Any:
    """numpy / pandas scalars -> JSON-friendly Python values."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


_GX_ASSET = re.compile(r"https://great-expectations-web-assets\.s3[\w.-]*\.amazonaws\.com/([\w.-]+)[^\"')\s]*")


def _copy_data_docs(site: Path, dest: Path) -> None:
    """Copies the rendered site, pointing its images at the bundled copies.

    GX's page header loads its logo from GX's servers with this context's id in the URL; a report
    must not call home when opened, so every page and stylesheet gets ``static/images/`` instead.
    (Styles and scripts still come from public CDNs; the page stays readable without them, and
    ``summary.md`` / ``summary.json`` hold the same findings offline.)
    """
    shutil.copytree(site, dest, dirs_exist_ok=True)
    images = dest / "static" / "images"
    for page in [*dest.rglob("*.html"), *dest.rglob("*.css")]:
        up = "../" * (len(page.relative_to(dest).parts) - 1)  # from the page back to the site root

        def local(match: re.Match, up: str = up) -> str:
            name = match[1] if (images / match[1]).exists() else "logo-long.png"
            return f"{up}static/images/{name}"

        page.write_text(_GX_ASSET.sub(local, page.read_text(encoding="utf-8")), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# The stage


def validate_training_data(
    path: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    bounds: ValidationParams | None = None,
    require_scores: bool = False,
    prompt: str | None = None,
) -> ValidationReport:
    """Runs the suite over one training JSONL; writes the report folder (atomically) when given.

    The report folder holds ``index.html`` (GX Data Docs), ``summary.json`` and ``summary.md``. It is
    written whether the data pass or fail: on failure it is the explanation. Nothing else is written.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    bounds = bounds or ValidationParams()
    rows = read_rows(path, prompt)
    checks = build_checks(bounds, require_scores)
    if report_dir is None:
        results = run_suite(rows, checks, None, bounds.sample_rows)
    else:
        with atomic_dir(report_dir) as tmp:
            results = run_suite(rows, checks, tmp, bounds.sample_rows)
            report = _report(path, require_scores, rows, results, str(report_dir))
            (tmp / "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            (tmp / "summary.md").write_text(render_markdown(report), encoding="utf-8")
        return report
    return _report(path, require_scores, rows, results, None)


def _report(path: Path, require_scores: bool, rows: list[dict], results: list[CheckResult],
            report_dir: str | None) -> ValidationReport:
    _attach_sample_rows(path, results)
    return ValidationReport(input=str(path), require_scores=require_scores, rows=len(rows),
                            success=all(r.success for r in results), checks=results, report_dir=report_dir)


def _attach_sample_rows(path: Path, results: list[CheckResult], width: int = 240) -> None:
    wanted = {line for r in results if not r.success for line in r.sample_lines}
    if not wanted:
        return
    texts = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number in wanted:
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                texts[number] = text if len(text) <= width else text[:width] + "..."
    for r in results:
        if not r.success:
            r.sample_rows = [f"{path}:{line}: {texts.get(line, '')}" for line in r.sample_lines]


def render_markdown(report: ValidationReport) -> str:
    status = "PASSED" if report.success else f"FAILED ({len(report.failed)} of {len(report.checks)} checks)"
    lines = [f"# Training data validation: {status}", "",
             f"- input: `{report.input}` ({report.rows} lines)",
             f"- teacher scores required: {'yes' if report.require_scores else 'no'}", "",
             "| check | expectation | column | result | failing rows |", "|---|---|---|---|---|"]
    for c in report.checks:
        rows = f"{c.observed_value} rows" if c.column is None else f"{c.unexpected_count} of {c.element_count}"
        lines.append(f"| {c.name} | `{c.expectation}` | {c.column or ''} | {'ok' if c.success else '**FAIL**'} | {rows} |")
    for c in report.failed:
        lines += ["", f"## {c.name}: {c.description}", "",
                  f"`{c.expectation}` on `{c.column}`: {c.unexpected_count} of {c.element_count} rows "
                  f"({c.unexpected_percent:.2f}%) fail." if c.column else
                  f"`{c.expectation}`: observed {c.observed_value}."]
        if c.sample_values:
            lines.append(f"Values found: {', '.join(repr(v) for v in c.sample_values)}")
        if c.sample_rows:
            lines += ["", "```", *c.sample_rows, "```"]
    return "\n".join(lines) + "\n"


def format_failures(report: ValidationReport) -> str:
    """The console version: one paragraph per failed check, with line numbers and sample lines."""
    out = [f"validation FAILED for {report.input}: {len(report.failed)} of {len(report.checks)} checks"]
    for c in report.failed:
        where = f" on {c.column}: {c.unexpected_count} of {c.element_count} rows" if c.column else \
            f": observed {c.observed_value}"
        out.append(f"- {c.name} ({c.expectation}{where}) -- {c.description}")
        if c.sample_lines:
            out.append(f"    lines {c.sample_lines}, values {c.sample_values}")
        out += [f"    {row}" for row in c.sample_rows[:3]]
    if report.report_dir:
        out.append(f"report: {report.report_dir}/summary.md and {report.report_dir}/index.html")
    return "\n".join(out)
