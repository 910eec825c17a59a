"""Release gate: tolerance arithmetic, verdicts, report files, and the baseline read at the release tag."""

from __future__ import annotations

import json

import pytest

from matryoshka_reranker.config import GateParams
from matryoshka_reranker.release.gate import (
    GateError,
    allowed_drop,
    compare,
    run_gate,
    write_report,
)
from tests.dvc_project import git, make_project, repro, set_knobs

MEASURES = ["nDCG@10", "RR@10"]


def metrics(**configs: tuple[float, float]) -> dict:
    out = {}
    for name, (ndcg, rr) in configs.items():
        k, r = int(name[5:7]), int(name.split("-")[-1])
        out[name] = {"exit_layer": k, "ratio": r, "nDCG@10": ndcg, "RR@10": rr}
    return {"format_version": 1, "configs": out}


OLD = metrics(**{"exit-08_ratio-1": (0.60, 0.50), "exit-16_ratio-1": (0.70, 0.60)})


def test_allowed_drop_takes_the_looser_bound_and_null_disables():
    assert allowed_drop(0.8, GateParams(max_drop_abs=0.02, max_drop_rel=0.05)) == pytest.approx(0.04)
    assert allowed_drop(0.2, GateParams(max_drop_abs=0.02, max_drop_rel=0.05)) == pytest.approx(0.02)
    assert allowed_drop(0.8, GateParams(max_drop_abs=None, max_drop_rel=0.05)) == pytest.approx(0.04)
    assert allowed_drop(0.8, GateParams(max_drop_abs=0.01, max_drop_rel=None)) == pytest.approx(0.01)
    assert allowed_drop(0.8, GateParams(max_drop_abs=None, max_drop_rel=None)) == 0.0


def test_small_drops_pass_and_improvements_are_reported():
    new = metrics(**{"exit-08_ratio-1": (0.59, 0.52), "exit-16_ratio-1": (0.70, 0.60)})
    report = compare(new, OLD, MEASURES, GateParams(max_drop_abs=0.02, max_drop_rel=None), baseline_version="v0.1.0")
    assert report.passed
    verdicts = {(c.config, c.measure): c.verdict for c in report.checks}
    assert verdicts[("exit-08_ratio-1", "nDCG@10")] == "pass"
    assert verdicts[("exit-08_ratio-1", "RR@10")] == "improved"
    assert verdicts[("exit-16_ratio-1", "nDCG@10")] == "pass"  # unchanged
    assert report.improvements == ["exit-08_ratio-1"] and report.regressions == []
    check = next(c for c in report.checks if c.config == "exit-08_ratio-1" and c.measure == "nDCG@10")
    assert check.delta == pytest.approx(-0.01) and check.old == 0.60 and check.new == 0.59


def test_one_regressed_layer_fails_and_is_named():
    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50), "exit-16_ratio-1": (0.70, 0.55)})  # RR@10 -0.05
    report = compare(new, OLD, MEASURES, GateParams(max_drop_abs=0.02, max_drop_rel=0.05))
    assert not report.passed
    assert report.regressions == ["exit-16_ratio-1"]
    failed = [c for c in report.checks if c.failed]
    assert [(c.config, c.measure, c.verdict) for c in failed] == [("exit-16_ratio-1", "RR@10", "regressed")]
    # 5 % of 0.60 = 0.03 and abs 0.02 both allow less than the 0.05 drop
    assert failed[0].allowed_drop == pytest.approx(0.03)


def test_relative_bound_alone_can_pass_a_drop_the_absolute_one_rejects():
    new = metrics(**{"exit-08_ratio-1": (0.57, 0.50), "exit-16_ratio-1": (0.70, 0.60)})  # -0.03 on 0.60
    assert not compare(new, OLD, MEASURES, GateParams(max_drop_abs=0.02, max_drop_rel=None)).passed
    assert compare(new, OLD, MEASURES, GateParams(max_drop_abs=0.02, max_drop_rel=0.05)).passed


def test_missing_config_or_measure_is_a_regression():
    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50)})
    report = compare(new, OLD, MEASURES, GateParams())
    assert not report.passed and report.regressions == ["exit-16_ratio-1"]
    assert {c.verdict for c in report.checks if c.config == "exit-16_ratio-1"} == {"missing"}

    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50), "exit-16_ratio-1": (0.70, 0.60)})
    del new["configs"]["exit-08_ratio-1"]["RR@10"]
    new["configs"]["exit-16_ratio-1"]["nDCG@10"] = float("nan")
    report = compare(new, OLD, MEASURES, GateParams())
    assert report.regressions == ["exit-08_ratio-1", "exit-16_ratio-1"]


def test_first_release_passes_and_records_baseline_but_still_needs_every_configured_exit():
    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50)})
    report = compare(new, None, MEASURES, GateParams(), expected_configs=["exit-08_ratio-1"])
    assert report.passed and {c.verdict for c in report.checks} == {"baseline"}
    assert report.to_dict()["first_release"] is True
    report = compare(new, None, MEASURES, GateParams(), expected_configs=["exit-08_ratio-1", "exit-16_ratio-1"])
    assert not report.passed and report.regressions == ["exit-16_ratio-1"]


def test_new_config_in_later_release_is_reported_not_failed():
    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50), "exit-16_ratio-1": (0.70, 0.60),
                     "exit-24_ratio-1": (0.75, 0.65)})
    report = compare(new, OLD, MEASURES, GateParams())
    assert report.passed
    assert {c.verdict for c in report.checks if c.config == "exit-24_ratio-1"} == {"new"}


def test_report_files_hold_every_check(tmp_path):
    new = metrics(**{"exit-08_ratio-1": (0.60, 0.50), "exit-16_ratio-1": (0.70, 0.55)})
    report = compare(new, OLD, MEASURES, GateParams(), baseline_version="v1.2.3", baseline_commit="abc123")
    folder = write_report(report, tmp_path / "reports" / "gate")
    data = json.loads((folder / "gate.json").read_text())
    assert data["passed"] is False and data["regressions"] == ["exit-16_ratio-1"]
    assert data["baseline"] == {"version": "v1.2.3", "commit": "abc123"}
    assert len(data["checks"]) == 4
    row = next(c for c in data["checks"] if c["config"] == "exit-16_ratio-1" and c["measure"] == "RR@10")
    assert row["old"] == 0.60 and row["new"] == 0.55 and row["delta"] == pytest.approx(-0.05)
    assert row["verdict"] == "regressed" and row["exit_layer"] == 16 and row["ratio"] == 1
    md = (folder / "gate.md").read_text()
    assert "FAILED" in md and "v1.2.3" in md and "**Regressed configs:** `exit-16_ratio-1`" in md
    assert "| exit-16_ratio-1 | RR@10 | 0.6000 | 0.5500 | -0.0500 |" in md
    assert sorted(p.name for p in folder.iterdir()) == ["gate.json", "gate.md"]  # no temp files left


def test_gate_reads_the_baseline_at_the_release_tag_not_the_workspace(tmp_path):
    root, params = make_project(tmp_path, git_remote=False)
    with pytest.raises(GateError, match="no metrics file"):
        run_gate(params, root)
    repro(root)
    first = run_gate(params, root)
    assert first.passed and first.baseline_version is None
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "state of v0.1.0")
    git(root, "tag", "-a", "v0.1.0", "-m", "release")
    # a later, worse run on one layer: the gate compares with the tagged metrics, read through DVC
    set_knobs(root, delta={"exit-06_ratio-2": -0.1})
    repro(root)
    report = run_gate(params, root)
    assert not report.passed and report.regressions == ["exit-06_ratio-2"]
    assert report.baseline_version == "v0.1.0" and report.baseline_commit == git(root, "rev-parse", "v0.1.0^{commit}")
    stored = json.loads((root / params.paths.gate_report / "gate.json").read_text())
    assert stored["regressions"] == ["exit-06_ratio-2"]
    # an explicit baseline tag that lacks the metrics is an error, not a pass
    git(root, "tag", "-a", "v0.0.1", "-m", "old", "HEAD~1")
    with pytest.raises(GateError, match="v0.0.1 has no metrics"):
        run_gate(params, root, baseline="v0.0.1")
