"""Release gate: no exit layer x ratio may lose quality against the last release.

The baseline is the per-layer metrics file *as committed at the last release tag*, read through
DVC at that tag (never a loose copy), so the comparison is with what users actually downloaded.
For every config (``exit-08_ratio-1``) and measure in ``evaluation.measures``:

    drop = old - new;  allowed = max(max_drop_abs, max_drop_rel * old)  (a null bound is off)

``drop > allowed`` is a regression, and so is a config or measure that the baseline (or the export
grid in params) has but the new metrics lack. Improvements and new configs are reported. With no
earlier release the gate passes and the new metrics become the baseline once published.
The report (``gate.json`` + ``gate.md`` under ``paths.gate_report``) is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_dir
from ..config import GateParams, Params
from ..serving.artifacts import NAME_RE as CONFIG_RE
from ..serving.artifacts import config_name
from .revisions import list_tags, open_at, rev_commit
from .versions import last_version

logger = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1


class GateError(RuntimeError):
    """The gate could not compare (unreadable metrics); distinct from a regression."""


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
    verdict: str  # improved | pass | regressed | missing | new | baseline

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
    checks: list[Check] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Configs with at least one failed check, in report order."""
        return list(dict.fromkeys(c.config for c in self.checks if c.failed))

    @property
    def improvements(self) -> list[str]:
        return list(dict.fromkeys(c.config for c in self.checks if c.verdict == "improved"))

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
        lines += [f"Allowed drop per measure: max(abs {tol['max_drop_abs']}, rel {tol['max_drop_rel']} x old).", ""]
        if self.regressions:
            lines += [f"**Regressed configs:** {', '.join(f'`{c}`' for c in self.regressions)}", ""]
        if self.improvements:
            lines += [f"Improved configs: {', '.join(f'`{c}`' for c in self.improvements)}", ""]
        lines += ["| config | measure | old | new | delta | allowed drop | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in self.checks:
            mark = f"**{c.verdict}**" if c.failed else c.verdict
            lines.append(f"| {c.config} | {c.measure} | {_fmt(c.old)} | {_fmt(c.new)} | {_fmt(c.delta, signed=True)} "
                         f"| {_fmt(c.allowed_drop)} | {mark} |")
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
    match = CONFIG_RE.match(name)
    return (int(match[1]), int(match[2])) if match else (None, None)


def compare(new_metrics: dict, old_metrics: dict | None, measures: list[str], gate: GateParams,
            expected_configs: list[str] = (), baseline_version: str | None = None,
            baseline_commit: str | None = None) -> GateReport:
    """Checks every (config, measure); ``old_metrics=None`` is the first release."""
    new_configs = new_metrics.get("configs") or {}
    old_configs = (old_metrics or {}).get("configs") or {}
    names = list(dict.fromkeys([*old_configs, *expected_configs, *new_configs]))
    checks = []
    for name in names:
        new_entry, old_entry = new_configs.get(name), old_configs.get(name)
        exit_layer, ratio = _layer_ratio(name, new_entry, old_entry)
        for measure in measures:
            new, old = _value(new_entry, measure), _value(old_entry, measure)
            delta = allowed = None
            if new is None:
                verdict = "missing"  # lost config or measure (or not a finite number)
            elif old_metrics is None:
                verdict = "baseline"
            elif old is None:
                verdict = "new"
            else:
                delta, allowed = new - old, allowed_drop(old, gate)
                verdict = "improved" if delta > 0 else "pass" if -delta <= allowed + 1e-12 else "regressed"
            checks.append(Check(name, exit_layer, ratio, measure, old, new, delta, allowed, verdict))
    report = GateReport(passed=not any(c.failed for c in checks), baseline_version=baseline_version,
                        baseline_commit=baseline_commit, measures=list(measures),
                        tolerance={"max_drop_abs": gate.max_drop_abs, "max_drop_rel": gate.max_drop_rel},
                        checks=checks)
    if not checks:
        report.passed = False  # no metrics at all is not a release
    return report


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


def release_metrics(repo: str | Path, version: str, metrics_path: str, remote_name: str | None = None) -> dict:
    """The per-layer metrics committed at release ``version``, read through DVC at that tag."""
    fs = open_at(repo, version, remote_name=remote_name)
    try:
        metrics = json.loads(fs.read_text(metrics_path))
    except FileNotFoundError:
        raise GateError(f"release {version} has no {metrics_path}; cannot compare with it") from None
    except json.JSONDecodeError as err:
        raise GateError(f"release {version}: {metrics_path} is not valid JSON ({err})") from None
    finally:
        fs.close()
    if not isinstance(metrics.get("configs"), dict):
        raise GateError(f"release {version}: {metrics_path} has no 'configs' mapping")
    return metrics


def expected_configs(params: Params) -> list[str]:
    return [config_name(k, r) for k in params.export.exit_layers for r in params.export.ratios]


def run_gate(params: Params, repo: str | Path = ".", baseline: str | None = None,
             write: bool = True) -> GateReport:
    """Compares ``paths.metrics`` with the last release (or ``baseline``) and writes the report."""
    repo = Path(repo)
    new_metrics = read_metrics(repo / params.paths.metrics)
    baseline = baseline or last_version(list_tags(repo))
    old_metrics = commit = None
    if baseline is not None:
        old_metrics = release_metrics(repo, baseline, params.paths.metrics, params.release.remote_name)
        commit = rev_commit(repo, baseline)
    report = compare(new_metrics, old_metrics, params.evaluation.measures, params.gate,
                     expected_configs=expected_configs(params), baseline_version=baseline, baseline_commit=commit)
    if write:
        write_report(report, repo / params.paths.gate_report)
    log = logger.info if report.passed else logger.error
    log("gate %s against %s: regressed %s, improved %s", "passed" if report.passed else "FAILED",
        baseline or "(first release)", report.regressions or "none", report.improvements or "none")
    return report


def write_report(report: GateReport, folder: str | Path) -> Path:
    """``gate.json`` + ``gate.md``, replaced together."""
    with atomic_dir(folder) as tmp:
        (tmp / "gate.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "gate.md").write_text(report.to_markdown(), encoding="utf-8")
    return Path(folder)
