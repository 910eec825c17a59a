"""Release gate: no exit layer x ratio may lose quality against the last release, beyond noise.

The baseline is the last *published* release, read from the release records that ``publish``
writes into the release remote (``release.remote_url``), the same place it claims versions in:
a clone without tags (``--no-tags``, shallow CI clones) sees the same baseline as the clone that
published. When the remote holds releases but their record cannot be read, the gate fails: it
never mistakes that for a first release.

For every (config, measure) the baseline has, and every config ``export`` asks for:

    delta = new - old (mean over the eval queries);  allowed = max(max_drop_abs, max_drop_rel * old)

A config *regresses* when the drop exceeds ``allowed`` AND a paired sign-flip permutation test over
the same queries says it is significant at ``gate.alpha`` (default 0.05): with ~100 queries, a
fixed tolerance alone either false-alarms on seed noise or misses real drops. The test is
one-sided in the direction of the change (H1: new < old for a drop): the gate only ever fails on
drops, and a two-sided test spends half of alpha on improvements it never acts on. Measured on
the default model: a zeroed exit-8 score head (nDCG@10 0.391 -> 0.324, i.e. random order) had a
two-sided p of 0.0502 and passed; one-sided it is 0.025 and fails (docs/release.md). The report
gives each delta with its bootstrap interval and p-value. A config or measure the baseline has but the
new metrics lack fails, and so does a comparison across different eval sets (query ids,
candidates, qrels) or with metrics whose ONNX-vs-PyTorch check did not pass.

The policy (``gate.*`` and ``evaluation.measures``) is the committed one: ``publish`` refuses a
release whose working or overridden policy differs from what is committed (see ``registry``).
The report (``gate.json`` + ``gate.md`` under ``paths.gate_report``) is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import GateParams, Params
from ..core.atomic import atomic_dir
from ..core.errors import CheckFailed, InputError
from ..pipeline import statistics
from ..serving.artifacts import NAME_RE, SPECIALIST, config_name

logger = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 2


class GateError(InputError):
    """The gate could not compare (unreadable or incomparable metrics); distinct from a regression."""


class GateFailed(CheckFailed):
    """At least one exit layer x ratio regressed (the report names them)."""


@dataclass
class Check:
    config: str
    exit_layer: int | None
    ratio: int | None
    measure: str
    old: float | None
    new: float | None
    delta: float | None  # new - old
    allowed_drop: float | None
    ci: list[float] | None  # interval of the paired per-query delta
    p_value: float | None
    verdict: str  # improved | pass | within-noise | regressed | missing | new | baseline

    @property
    def failed(self) -> bool:
        return self.verdict in ("regressed", "missing")


@dataclass
class GateReport:
    passed: bool
    baseline_version: str | None
    baseline_commit: str | None
    measures: list[str]
    tolerance: dict[str, float | None]
    eval: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Configs with at least one failed check, in report order."""
        return list(dict.fromkeys(c.config for c in self.checks if c.failed))

    @property
    def improvements(self) -> list[str]:
        return list(dict.fromkeys(c.config for c in self.checks if c.verdict == "improved"))

    def raise_if_failed(self, gate_report_dir: str | None = None) -> None:
        """``GateFailed`` naming the regressed configs (and where the report is), when the gate did not pass."""
        if not self.passed:
            where = f"; see {gate_report_dir}/gate.md" if gate_report_dir else ""
            raise GateFailed(f"gate failed: regressed configs {', '.join(self.regressions)}{where}. "
                             "Nothing was published")

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for check in self.checks:
            counts[check.verdict] = counts.get(check.verdict, 0) + 1
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "passed": self.passed,
            "first_release": self.baseline_version is None,
            "baseline": {"version": self.baseline_version, "commit": self.baseline_commit},
            "measures": self.measures,
            "tolerance": self.tolerance,
            "eval": self.eval,
            "regressions": self.regressions,
            "improvements": self.improvements,
            "counts": counts,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"# Release gate: {verdict}", ""]
        if self.baseline_version is None:
            lines.append("First release: no earlier release to compare with; these metrics become the baseline.")
        else:
            lines.append(f"Baseline: release `{self.baseline_version}` (commit `{(self.baseline_commit or '')[:12]}`).")
        tol = self.tolerance
        queries = self.eval.get("queries", "?")
        lines += [f"A config regresses when its drop exceeds max(abs {tol['max_drop_abs']}, rel "
                  f"{tol['max_drop_rel']} x old) **and** a paired permutation test over the {queries} eval "
                  f"queries (one-sided, in the direction of the change) gives p < {tol['alpha']}. "
                  f"Intervals: {int(100 * tol['confidence'])}% bootstrap of the per-query delta.", ""]
        if self.regressions:
            lines += [f"**Regressed configs:** {', '.join(f'`{c}`' for c in self.regressions)}", ""]
        if self.improvements:
            lines += [f"Improved configs: {', '.join(f'`{c}`' for c in self.improvements)}", ""]
        lines += ["| config | measure | old | new | delta | interval | p | allowed drop | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in self.checks:
            mark = f"**{c.verdict}**" if c.failed else c.verdict
            ci = f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]" if c.ci else "-"
            p = "-" if c.p_value is None else f"{c.p_value:.3g}"
            lines.append(f"| {c.config} | {c.measure} | {_fmt(c.old)} | {_fmt(c.new)} | {_fmt(c.delta, signed=True)} "
                         f"| {ci} | {p} | {_fmt(c.allowed_drop)} | {mark} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def allowed_drop(old: float, gate: GateParams) -> float:
    bounds = [b for b in (gate.max_drop_abs, None if gate.max_drop_rel is None else gate.max_drop_rel * abs(old))
              if b is not None]
    return max(bounds) if bounds else 0.0


def _value(entry: dict | None, measure: str) -> float | None:
    value = (entry or {}).get(measure)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _layer_ratio(name: str, *entries: dict | None) -> tuple[int | None, int | None]:
    for entry in entries:
        if entry and "exit_layer" in entry and "ratio" in entry:
            return entry["exit_layer"], entry["ratio"]
    match = NAME_RE.match(name)
    return (int(match[1]), int(match[2])) if match else (None, None)


def compare(new: dict, old: dict | None, measures: list[str], gate: GateParams, expected_configs: list[str] = (),
            baseline_version: str | None = None, baseline_commit: str | None = None,
            confidence: float = 0.95, resamples: int = 10_000) -> GateReport:
    """Checks every (config, measure). ``new``/``old``: {"metrics": per_layer, "per_query": {config: {measure:
    {qid: value}}}}; ``old=None`` is the first release."""
    new_metrics, old_metrics = new["metrics"], (old or {}).get("metrics")
    new_configs = new_metrics.get("configs") or {}
    old_configs = (old_metrics or {}).get("configs") or {}
    if old is not None:
        _check_comparable(new_metrics, old_metrics, baseline_version)
    every_measure = list(dict.fromkeys([*measures, *sorted(_measure_names(old_configs))]))  # all the baseline has
    names = list(dict.fromkeys([*old_configs, *expected_configs, *new_configs]))
    checks = []
    for name in names:
        new_entry, old_entry = new_configs.get(name), old_configs.get(name)
        exit_layer, ratio = _layer_ratio(name, new_entry, old_entry)
        for measure in every_measure:
            value_new, value_old = _value(new_entry, measure), _value(old_entry, measure)
            delta = allowed = ci = p = None
            if value_new is None:
                verdict = "missing"  # lost config or measure (or not a finite number)
            elif old is None:
                verdict = "baseline"
            elif value_old is None:
                verdict = "new"
            else:
                delta, allowed = value_new - value_old, allowed_drop(value_old, gate)
                paired = _paired(new, old, name, measure, confidence, resamples,
                                 alternative="greater" if delta > 0 else "less")
                if paired is not None:
                    ci, p = [round(paired.low, 6), round(paired.high, 6)], round(paired.p_value, 6)
                if delta > 0:
                    verdict = "improved" if p is not None and p < gate.alpha else "pass"
                elif -delta <= allowed + 1e-12:
                    verdict = "pass"
                elif p is None or p < gate.alpha:
                    verdict = "regressed"
                else:
                    verdict = "within-noise"  # beyond the tolerance, but not distinguishable from noise
            checks.append(Check(name, exit_layer, ratio, measure, value_old, value_new, delta, allowed, ci, p, verdict))
    report = GateReport(passed=not any(c.failed for c in checks), baseline_version=baseline_version,
                        baseline_commit=baseline_commit, measures=every_measure,
                        tolerance={"max_drop_abs": gate.max_drop_abs, "max_drop_rel": gate.max_drop_rel,
                                   "alpha": gate.alpha, "confidence": confidence},
                        eval={k: new_metrics.get("eval", {}).get(k) for k in ("queries", "candidates")},
                        checks=checks)
    if not checks:
        report.passed = False  # no metrics at all is not a release
    return report


def _measure_names(configs: dict) -> set[str]:
    return {m for entry in configs.values() for m, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and m not in (
                "exit_layer", "ratio", "latency_ms_per_query", "pairs_per_s", "latency_queries",
                "spearman_vs_float")}  # a variant's agreement with its float config: a description, not quality


def _paired(new: dict, old: dict, config: str, measure: str, confidence: float, resamples: int, alternative: str):
    a = (new.get("per_query") or {}).get(config, {}).get(measure)
    b = (old.get("per_query") or {}).get(config, {}).get(measure)
    if a is None or b is None:
        return None
    x, y = statistics.aligned(a, b)
    return statistics.paired_difference(x, y, confidence, resamples, alternative=alternative)


IDENTITY_KEYS = ("split", "queries", "query_ids_sha256", "candidates_per_query", "candidates_sha256", "qrels_sha256")


def _check_comparable(new_metrics: dict, old_metrics: dict, version: str | None) -> None:
    new_id = (new_metrics.get("eval") or {}).get("identity")
    old_id = (old_metrics.get("eval") or {}).get("identity")
    if new_id is None or old_id is None:
        raise GateError(f"cannot compare with release {version}: {'new' if new_id is None else 'baseline'} metrics "
                        "carry no eval-set identity (re-run evaluate with this version of matryoshka-reranker)")
    missing = [k for k in IDENTITY_KEYS if k not in old_id] + [k for k in set(old_id) | set(IDENTITY_KEYS)
                                                                if k not in new_id]
    if missing:
        raise GateError(f"cannot compare with release {version}: the eval-set identity lacks {', '.join(sorted(missing))} "
                        "(re-run evaluate with this version of matryoshka-reranker)")
    # what both sides carry must agree; a key only the new metrics carry (texts_sha256, added later) cannot be
    # checked against a release evaluated before it existed, and is checked from the next release on
    differ = [k for k in sorted(set(new_id) & set(old_id)) if new_id[k] != old_id[k]]
    if differ:
        raise GateError(f"the new metrics were computed on a different eval set than release {version} "
                        f"({', '.join(f'{k}: {old_id.get(k)!r} -> {new_id.get(k)!r}' for k in differ)}); "
                        "a gate across eval sets compares nothing")


def check_metrics_are_releasable(metrics: dict) -> None:
    """The evaluate stage's ONNX-vs-PyTorch check must have run and passed."""
    check = metrics.get("pytorch_check") or {}
    if check.get("enabled") and not check.get("passed"):
        raise GateError("the metrics' ONNX-vs-PyTorch check did not pass; refusing to gate or release them")


def metrics_rows(metrics: dict, measures: list[str]) -> list[dict]:
    """One row per config of an evaluation's metrics: exit, ratio, each measure, latency (a table artifact)."""
    return [{"config": name, "exit_layer": entry.get("exit_layer"), "ratio": entry.get("ratio"),
             **{m: entry.get(m) for m in measures}, "latency_ms_per_query": entry.get("latency_ms_per_query")}
            for name, entry in metrics["configs"].items()]


def read_metrics(path: str | Path) -> dict:
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{path}: no metrics file; run the evaluate stage first") from None
    except json.JSONDecodeError as err:
        raise GateError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("configs"), dict):
        raise GateError(f"{path}: expected a JSON object with a 'configs' mapping")
    return metrics


def read_per_query(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """{config: {measure: {query id: value}}} from the evaluate stage's per-query file ({} if absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("systems", {})


def expected_configs(params: Params) -> list[str]:
    """Every config the export writes and the release needs metrics for (the exit specialists included)."""
    return ([config_name(k, r) for k in params.export.exit_layers for r in params.export.ratios]
            + [config_name(k, 1, SPECIALIST) for k in params.specialist.exits])


def current_results(params: Params, repo: str | Path = ".") -> dict:
    """What this checkout would release: its metrics and per-query values."""
    repo = Path(repo)
    metrics = read_metrics(repo / params.paths.metrics)
    check_metrics_are_releasable(metrics)
    return {"metrics": metrics, "per_query": read_per_query(repo / params.paths.per_query)}


def run_gate(params: Params, repo: str | Path = ".", baseline: str | None = None, write: bool = True) -> GateReport:
    """Compares this checkout's metrics with the last release (or ``baseline``) and writes the report."""
    from .records import UNRELEASED, RecordStore

    repo = Path(repo)
    new = current_results(params, repo)
    store = RecordStore.from_params(params, repo)
    version = baseline or store.latest_version(params)
    old = commit = None
    if version is not None:
        record = store.read(version)
        if record.get("status") in UNRELEASED:  # an explicit --baseline naming a claim or an abandoned publish
            raise GateError(f"{version} is not a release (its record: {record['status']}); name a published version")
        old = {"metrics": record.get("metrics") or {}, "per_query": record.get("per_query") or {}}
        commit = record.get("commit")
    report = compare(new, old, params.evaluation.measures, params.gate, expected_configs=expected_configs(params),
                     baseline_version=version, baseline_commit=commit, confidence=params.evaluation.confidence,
                     resamples=params.evaluation.bootstrap_resamples)
    if write:
        write_report(report, repo / params.paths.gate_report)
    log = logger.info if report.passed else logger.error
    log("gate %s against %s: regressed %s, improved %s", "passed" if report.passed else "FAILED",
        version or "(first release)", report.regressions or "none", report.improvements or "none")
    return report


def write_report(report: GateReport, folder: str | Path) -> Path:
    """``gate.json`` + ``gate.md``, replaced together."""
    with atomic_dir(folder) as tmp:
        (tmp / "gate.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "gate.md").write_text(report.to_markdown(), encoding="utf-8")
    return Path(folder)
