"""Publish to a real local DVC remote + git tags, download by version with sha256 checks, refusals."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from matryoshka_reranker.cli import app
from matryoshka_reranker.release.registry import (
    ManifestError,
    ReleaseError,
    _missing_objects,
    artifacts_out_of_sync,
    download,
    ensure_remote,
    expected_artifacts,
    list_releases,
    publish,
    sync_artifacts,
    verify_manifest,
)
from matryoshka_reranker.release.versions import (
    VersionError,
    check_new_version,
    next_version,
)
from tests.dvc_project import dvc, git, make_params, make_project, repro, run, set_knobs

# --- version names ------------------------------------------------------------------------------


def test_semver_bumps_the_patch_of_the_last_release():
    assert next_version([], "semver") == "v0.1.0"
    assert next_version(["v0.1.0", "v0.2.3", "v0.10.0", "exit-04-ratio-1@v0.10.0", "nightly"], "semver") == "v0.10.1"


def test_date_versions_count_up_within_a_day_and_stay_semver():
    day = dt.date(2026, 1, 5)
    assert next_version([], "date", today=day) == "v2026.105.0"
    assert next_version(["v2026.105.0"], "date", today=day) == "v2026.105.1"
    assert next_version(["v2026.105.0", "v2026.105.1"], "date", today=dt.date(2026, 11, 23)) == "v2026.1123.0"
    with pytest.raises(VersionError, match="not be newer"):
        next_version(["v2027.101.0"], "date", today=day)


def test_explicit_versions_must_be_new_newer_and_well_formed():
    assert check_new_version("v1.0.0", ["v0.9.9"]) == "v1.0.0"
    with pytest.raises(VersionError, match="already released"):
        check_new_version("v0.9.9", ["v0.9.9"])
    with pytest.raises(VersionError, match="not newer"):
        check_new_version("v0.9.0", ["v0.9.9"])
    for bad in ("1.0.0", "v1.0", "v2026.01.05", "v1.0.0.1"):
        with pytest.raises(VersionError, match="must look like"):
            check_new_version(bad, [])


# --- dvc.yaml artifacts -------------------------------------------------------------------------


def test_artifacts_section_follows_params_and_keeps_the_rest(tmp_path):
    root = tmp_path
    text = "# my pipeline\nstages:\n  train:  # keep me\n    cmd: echo hi\nartifacts:\n  tokenizer:\n" \
           "    path: data/tok.json\n    type: data\n  exit-30-ratio-4:\n    path: models/onnx/exit-30_ratio-4\n" \
           "    type: model\n"
    (root / "dvc.yaml").write_text(text)
    params = make_params(tmp_path / "remote")
    problems = artifacts_out_of_sync(params, root)
    assert "missing artifact exit-04-ratio-1" in problems
    assert "artifact exit-30-ratio-4 is not in export.exit_layers x export.ratios" in problems
    assert sync_artifacts(params, root) is True
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    assert sorted(doc["artifacts"]) == ["exit-04-ratio-1", "exit-04-ratio-2", "exit-06-ratio-1", "exit-06-ratio-2",
                                        "tokenizer"]
    assert doc["artifacts"]["exit-06-ratio-2"]["path"] == "models/onnx/exit-06_ratio-2"
    assert doc["artifacts"]["exit-06-ratio-2"]["type"] == "model"
    assert doc["stages"] == {"train": {"cmd": "echo hi"}}
    assert "# my pipeline" in (root / "dvc.yaml").read_text() and "# keep me" in (root / "dvc.yaml").read_text()
    assert artifacts_out_of_sync(params, root) == []
    assert sync_artifacts(params, root) is False  # idempotent
    result = CliRunner().invoke(app, ["artifacts", "--check", "--repo", str(root), "-p", str(_params_file(root, params)),
                                      "-S", "export.exit_layers=[4]"])
    assert result.exit_code == 1 and "exit-06-ratio-1 is not in" in result.output


def _params_file(root: Path, params) -> Path:
    path = root / "params.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return path


# --- manifests ----------------------------------------------------------------------------------


def test_verify_manifest_catches_changed_missing_and_extra_files(tmp_path):
    folder = tmp_path / "exit-08_ratio-1"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"weights")
    manifest = {"format_version": 1, "files": {"model.onnx": hashlib.sha256(b"weights").hexdigest()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_manifest(folder)["files"] == manifest["files"]
    (folder / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(ManifestError, match="sha256 mismatch: model.onnx"):
        verify_manifest(folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="missing model.onnx"):
        verify_manifest(folder)
    (folder / "model.onnx").write_bytes(b"weights")
    (folder / "extra.bin").write_bytes(b"?")
    with pytest.raises(ManifestError, match="unexpected file extra.bin"):
        verify_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({"files": manifest["files"]}))
    with pytest.raises(ManifestError, match="format_version"):
        verify_manifest(folder)


# --- publish and download -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A project released once as v0.1.0 (tags pushed to a bare origin, data in a local DVC remote)."""
    base = tmp_path_factory.mktemp("published")
    root, params = make_project(base)
    repro(root)
    result = publish(params, root)
    return base, root, params, result


def test_publish_commits_reproduced_state_pushes_data_and_tags(published):
    base, root, params, result = published
    assert result.status == "published" and result.version == "v0.1.0"
    assert result.gate.passed and result.gate.baseline_version is None
    names = sorted(expected_artifacts(params))
    assert result.tags == ["v0.1.0"] + [f"{n}@v0.1.0" for n in names]
    assert git(root, "status", "--porcelain") == ""  # dvc.lock, metrics, gate report committed
    assert git(root, "log", "-1", "--format=%s") == "Release v0.1.0"
    committed = git(root, "show", "--name-only", "--format=", "HEAD").splitlines()
    assert {"dvc.lock", "metrics/per_layer.json", "reports/gate/gate.json", ".dvc/config"} <= set(committed)
    # the remote is in the config *at the tag* (absolute path), so clones can fetch
    config_at_tag = git(root, "show", "v0.1.0:.dvc/config")
    assert "releases" in config_at_tag and str(base / "dvc-remote") in config_at_tag
    # tags reached origin, the remote records the version
    remote_tags = git(root, "ls-remote", "--tags", "--refs", "origin")
    assert all(f"refs/tags/{t}" in remote_tags for t in result.tags)
    record = json.loads((base / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["commit"] == result.commit and record["gate"]["passed"] is True
    assert set(record["metrics"]) == {"exit-04_ratio-1", "exit-04_ratio-2", "exit-06_ratio-1", "exit-06_ratio-2"}


def test_download_by_version_into_a_fresh_clone_verifies_sha256(published, tmp_path):
    base, root, params, result = published
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(base / "origin.git"), str(fresh)], tmp_path)
    assert not (fresh / ".dvc" / "cache").exists()  # nothing local: the data must come from the remote
    with contextlib.chdir(fresh):
        cli = CliRunner().invoke(app, ["download", "--version", "v0.1.0", "--layer", "6", "--ratio", "2",
                                       "--out", "downloaded"])
    assert cli.exit_code == 0, cli.output
    dest = fresh / "downloaded" / "exit-06_ratio-2"
    source = root / "models" / "onnx" / "exit-06_ratio-2"
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["manifest.json", "model.onnx", "tokenizer/tokenizer.json"]
    assert all((dest / f).read_bytes() == (source / f).read_bytes() for f in files)
    # from the git URL directly (DVC clones it), and a layer the release does not have
    dest = download("v0.1.0", 4, 1, repo=str(base / "origin.git"), out=tmp_path / "by-url")
    verify_manifest(dest)
    with pytest.raises(ReleaseError, match="no exit model exit-08-ratio-1; it has: exit-04-ratio-1"):
        download("v0.1.0", 8, 1, repo=str(base / "origin.git"), out=tmp_path / "none")
    with pytest.raises(ReleaseError, match="no release v9.9.9; releases: v0.1.0"):
        download("v9.9.9", 4, 1, repo=str(base / "origin.git"), out=tmp_path / "none")


def test_dvc_artifacts_get_and_releases_listing(published, tmp_path):
    base, root, params, result = published
    out = tmp_path / "art"
    dvc(tmp_path, "artifacts", "get", str(base / "origin.git"), "exit-04-ratio-2", "--rev", "v0.1.0", "-o", str(out))
    verify_manifest(out)
    releases = list_releases(str(base / "origin.git"))
    assert [r["version"] for r in releases] == ["v0.1.0"]
    assert releases[0]["configs"]["exit-06_ratio-1"]["nDCG@10"] == pytest.approx(0.56)
    cli = CliRunner().invoke(app, ["releases", "--repo", str(base / "origin.git")])
    assert cli.exit_code == 0 and "## v0.1.0" in cli.output and "| exit-06_ratio-1 | 0.5600 |" in cli.output


def test_nothing_changed_means_nothing_to_publish(published):
    base, root, params, result = published
    again = publish(params, root)
    assert again.status == "unchanged" and again.version == "v0.1.0"
    with pytest.raises(ReleaseError, match="already release v0.1.0"):
        publish(params, root, version="v0.2.0")


def test_one_dvc_output_per_exit_model_is_published_whole(tmp_path):
    root, params = make_project(tmp_path, per_config_outs=True)
    assert "outs: [models/onnx/exit-04_ratio-1, models/onnx/exit-04_ratio-2," in (root / "dvc.yaml").read_text()
    repro(root)
    assert publish(params, root).status == "published"
    dest = download("v0.1.0", 4, 2, repo=str(tmp_path / "origin.git"), out=tmp_path / "out")
    assert (dest / "model.onnx").read_bytes() == (root / "models/onnx/exit-04_ratio-2/model.onnx").read_bytes()


def test_tampered_remote_file_is_refused_and_nothing_is_written(tmp_path):
    root, params = make_project(tmp_path)
    repro(root)
    publish(params, root)
    model = root / "models" / "onnx" / "exit-04_ratio-1" / "model.onnx"
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    stored = tmp_path / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
    stored.chmod(0o644)
    stored.write_bytes(b"a backdoored model")  # DVC does not re-hash what it downloads; we do
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match="sha256 mismatch: model.onnx"):
        download("v0.1.0", 4, 1, repo=str(tmp_path / "origin.git"), out=out)
    assert not out.exists() or list(out.iterdir()) == []
    cli = CliRunner().invoke(app, ["download", "--version", "v0.1.0", "--layer", "4", "--repo",
                                   str(tmp_path / "origin.git"), "--out", str(out)])
    assert cli.exit_code == 1 and "sha256 mismatch" in cli.output


def test_republishing_a_version_is_refused_even_if_the_local_tag_is_gone(tmp_path):
    root, params = make_project(tmp_path, git_remote=False)
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    set_knobs(root, quality=0.6)
    repro(root)
    with pytest.raises(VersionError, match="v0.1.0 is already released"):
        publish(params, root, version="v0.1.0")
    for tag in git(root, "tag").splitlines():
        git(root, "tag", "-d", tag)  # the remote's record still knows v0.1.0
    with pytest.raises(VersionError, match="v0.1.0 is already released"):
        publish(params, root, version="v0.1.0")
    assert publish(params, root).version == "v0.1.1"


def test_publish_refuses_unclean_state_and_failed_gate(tmp_path):
    root, params = make_project(tmp_path, git_remote=False)
    (root / "README.md").write_text("project\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "readme")
    with pytest.raises(ReleaseError, match=r"not reproduced \(`dvc status` is not clean\)"):
        publish(params, root)
    repro(root)
    (root / "README.md").write_text("edited\n")
    with pytest.raises(ReleaseError, match="did not make: README.md"):
        publish(params, root)
    git(root, "checkout", "README.md")
    narrow = make_params(tmp_path / "dvc-remote", None).model_copy(
        update={"export": params.export.model_copy(update={"exit_layers": [4]})})
    with pytest.raises(ReleaseError, match="artifacts do not match params"):
        publish(narrow, root)
    assert git(root, "tag") == ""
    publish(params, root)
    head = git(root, "rev-parse", "HEAD")
    # a later run that loses quality on one exit layer: refused, nothing committed, tagged or pushed
    set_knobs(root, delta={"exit-04_ratio-2": -0.05})
    repro(root)
    with pytest.raises(ReleaseError, match="gate failed: regressed configs exit-04_ratio-2"):
        publish(params, root)
    assert git(root, "rev-parse", "HEAD") == head
    assert sorted(t for t in git(root, "tag").splitlines() if "@" not in t) == ["v0.1.0"]
    assert sorted(p.name for p in (tmp_path / "dvc-remote" / "releases").iterdir()) == ["v0.1.0.json"]
    gate = json.loads((root / "reports" / "gate" / "gate.json").read_text())
    assert gate["regressions"] == ["exit-04_ratio-2"] and gate["baseline"]["version"] == "v0.1.0"
    cli = CliRunner().invoke(app, ["publish", "--repo", str(root), "-p", str(root / "params.yaml")])
    assert cli.exit_code == 1 and "gate failed" in cli.output
    # dropping an exit layer from the metrics is a regression too
    set_knobs(root, delta={}, drop=["exit-06_ratio-1"])
    repro(root)
    cli = CliRunner().invoke(app, ["gate", "--repo", str(root), "-p", str(root / "params.yaml")])
    assert cli.exit_code == 1 and "exit-06_ratio-1" in cli.output and "missing" in cli.output


def test_tag_made_before_the_remote_is_backfilled_and_still_downloadable(tmp_path, caplog):
    """DVC pitfall: `dvc push -A/-T` skip a tag whose commit lacks the remote config; we push it ourselves."""
    from dvc.repo import Repo

    root, params = make_project(tmp_path)
    repro(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "an early model, tagged by hand before any remote")
    git(root, "tag", "-a", "v0.0.1", "-m", "legacy")
    git(root, "push", "-q", "origin", "main", "v0.0.1")
    set_knobs(root, quality=0.55, model_seed=1)  # a newer model, committed with the remote config
    repro(root)
    ensure_remote(root, params.release.remote_name, params.release.remote_url)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "newer model; add the release remote")
    dvc(root, "push", "-A", "-r", "releases")
    dvc(root, "push", "-T", "-r", "releases")
    with contextlib.chdir(root), Repo(str(root)) as repo:
        new, lost = _missing_objects(repo, ["models/onnx"], "v0.0.1", "releases")
    assert new and not lost  # the pitfall, reproduced: both pushes left v0.0.1's models out

    with caplog.at_level(logging.WARNING):
        assert publish(params, root).version == "v0.0.2"
    assert "back-filled" in caplog.text and "v0.0.1" in caplog.text
    with contextlib.chdir(root), Repo(str(root)) as repo:
        assert _missing_objects(repo, ["models/onnx"], "v0.0.1", "releases") == (set(), set())

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        old = download("v0.0.1", 6, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "old")
    assert "tagged before DVC remote 'releases'" in caplog.text
    assert (old / "model.onnx").read_bytes().startswith(b"onnx exit-06_ratio-1 data 1\n 0\n")  # seed 0: legacy
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new = download("v0.0.2", 6, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "new")
    assert "tagged before" not in caplog.text
    assert (new / "model.onnx").read_bytes().startswith(b"onnx exit-06_ratio-1 data 1\n 1\n")
    # an explicit URL works too (e.g. a remote that moved)
    moved = tmp_path / "moved-remote"
    shutil.copytree(tmp_path / "dvc-remote", moved)
    download("v0.0.1", 4, 2, repo=str(tmp_path / "origin.git"), out=tmp_path / "explicit", remote_url=str(moved))
