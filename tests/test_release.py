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
from matryoshka_reranker.release.gate import GateError, GateFailed, run_gate
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
from matryoshka_reranker.release.revisions import RevisionError
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
    with pytest.raises(VersionError, match="already taken"):
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
           "    path: data/tok.json\n    type: data\n  exit-30-ratio-4:\n    path: models/onnx/exit-30-ratio-4\n" \
           "    type: model\n"
    (root / "dvc.yaml").write_text(text)
    params = make_params(tmp_path / "remote")
    problems = artifacts_out_of_sync(params, root)
    assert "missing artifact exit-04-ratio-1" in problems
    assert "artifact exit-30-ratio-4 is not in export.exit_layers x export.ratios (or specialist.exits)" in problems
    assert sync_artifacts(params, root) is True
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    assert sorted(doc["artifacts"]) == ["exit-04-ratio-1", "exit-04-ratio-2", "exit-06-ratio-1", "exit-06-ratio-2",
                                        "tokenizer"]
    assert doc["artifacts"]["exit-06-ratio-2"]["path"] == "models/onnx/ratio-2"  # the exits of a ratio share a folder
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
    folder = tmp_path / "ratio-1"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"weights")
    manifest = {"format_version": 3, "models": [{"name": "exit-08-ratio-1", "exit_layer": 8, "model_file": "model.onnx"}],
                "files": {"model.onnx": hashlib.sha256(b"weights").hexdigest()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_manifest(folder)["files"] == manifest["files"]
    (folder / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(ManifestError, match=r"model.onnx: sha256 .* does not match"):
        verify_manifest(folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="model.onnx is listed but missing"):
        verify_manifest(folder)
    (folder / "model.onnx").write_bytes(b"weights")
    (folder / "extra.bin").write_bytes(b"?")
    with pytest.raises(ManifestError, match="extra.bin is not listed in the manifest"):
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
    assert {"dvc.lock", "metrics/per_layer.json", "reports/gate/gate.json", ".dvc/config",
            "releases/v0.1.0.json"} <= set(committed)
    # the remote is in the config *at the tag* (absolute path), so clones can fetch
    config_at_tag = git(root, "show", "v0.1.0:.dvc/config")
    assert "releases" in config_at_tag and str(base / "dvc-remote") in config_at_tag
    # tags reached origin, the remote records the version
    remote_tags = git(root, "ls-remote", "--tags", "--refs", "origin")
    assert all(f"refs/tags/{t}" in remote_tags for t in result.tags)
    record = json.loads((base / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["commit"] == result.commit and record["gate"]["passed"] is True and record["status"] == "published"
    configs = {"exit-04-ratio-1", "exit-04-ratio-2", "exit-06-ratio-1", "exit-06-ratio-2"}
    assert set(record["metrics"]["configs"]) == set(record["per_query"]) == set(record["files"]) == configs
    assert record["files"]["exit-04-ratio-1"]["weights.bin"] == hashlib.sha256(
        (root / "models/onnx/ratio-1/weights.bin").read_bytes()).hexdigest()
    assert record["files"]["exit-04-ratio-1"] == record["files"]["exit-06-ratio-1"]  # one folder per ratio
    assert record["policy"]["gate"]["alpha"] == 0.05 and record["eval"]["identity"]["queries"] == 40
    in_git = json.loads(git(root, "show", "v0.1.0:releases/v0.1.0.json"))  # the copy download trusts
    assert in_git["files"] == record["files"] and "commit" not in in_git
    assert "remote = releases" not in (root / ".dvc" / "config").read_text()  # never the default remote


def test_download_by_version_into_a_fresh_clone_verifies_sha256(published, tmp_path):
    base, root, params, result = published
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(base / "origin.git"), str(fresh)], tmp_path)
    assert not (fresh / ".dvc" / "cache").exists()  # nothing local: the data must come from the remote
    with contextlib.chdir(fresh):
        cli = CliRunner().invoke(app, ["download", "--version", "v0.1.0", "--layer", "6", "--ratio", "2",
                                       "--out", "downloaded"])
    assert cli.exit_code == 0, cli.output
    dest = fresh / "downloaded" / "v0.1.0" / "ratio-2"  # per version: a second one lands beside it
    source = root / "models" / "onnx" / "ratio-2"
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["exit-04.onnx", "exit-06.onnx", "manifest.json", "tokenizer.json", "weights.bin"]
    assert all((dest / f).stat().st_nlink == 1 for f in files)  # plain files: standard ONNX tools open them
    assert all((dest / f).read_bytes() == (source / f).read_bytes() for f in files)
    inode = (dest / "weights.bin").stat().st_ino
    with contextlib.chdir(fresh):  # exit 4 of the same ratio: the folder is there and verifies, nothing is fetched
        again = CliRunner().invoke(app, ["download", "--version", "v0.1.0", "--layer", "4", "--ratio", "2",
                                         "--out", "downloaded"])
    assert again.exit_code == 0 and again.stdout.strip() == str(Path("downloaded") / "v0.1.0" / "ratio-2")
    assert (dest / "weights.bin").stat().st_ino == inode  # not replaced
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
    dvc(tmp_path, "artifacts", "get", str(base / "origin.git"), "exit-04-ratio-2", "--rev", "v0.1.0", "-o", str(out),
        "--remote", "releases")  # the release remote is not the default remote
    verify_manifest(out)
    releases = list_releases(str(base / "origin.git"))
    assert [r["version"] for r in releases] == ["v0.1.0"]
    assert releases[0]["configs"]["exit-06-ratio-1"]["nDCG@10"] == pytest.approx(0.56)
    cli = CliRunner().invoke(app, ["releases", "--repo", str(base / "origin.git")])
    assert cli.exit_code == 0 and "## v0.1.0" in cli.output and "| exit-06-ratio-1 | 0.5600 |" in cli.output


@pytest.mark.parametrize("how", ["params.yaml", "override"])
def test_a_release_remote_with_its_own_name_is_found_without_options(tmp_path, how):
    """``release.remote_name: models``, set in the committed params.yaml or only for the publish (as
    ``-S release.remote_name=models`` does): downloads, listings and ``fetch_release`` (``from_release``,
    ``serve --version``) find the remote with no option, from the release record at the tag."""
    from matryoshka_reranker.release.registry import fetch_release

    root, params = make_project(tmp_path, remote_name="models" if how == "params.yaml" else "releases")
    if how == "override":
        params = params.model_copy(update={"release": params.release.model_copy(update={"remote_name": "models"})})
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    assert """['remote "models"']""" in git(root, "show", "v0.1.0:.dvc/config")
    assert ("remote_name: models" in git(root, "show", "v0.1.0:params.yaml")) == (how == "params.yaml")
    origin = str(tmp_path / "origin.git")
    dest = download("v0.1.0", 6, 2, repo=origin, out=tmp_path / "downloaded")
    verify_manifest(dest)
    assert [r["version"] for r in list_releases(origin)] == ["v0.1.0"]
    version, folders = fetch_release("latest", origin, [4], [1], cache=tmp_path / "cache")
    assert version == "v0.1.0" and [f.name for f in folders] == ["ratio-1"]


def test_nothing_changed_means_nothing_to_publish(published):
    base, root, params, result = published
    again = publish(params, root)
    assert again.status == "unchanged" and again.version == "v0.1.0"
    with pytest.raises(ReleaseError, match="already release v0.1.0"):
        publish(params, root, version="v0.2.0")


def test_one_dvc_output_per_exit_model_is_published_whole(tmp_path):
    root, params = make_project(tmp_path, per_config_outs=True)
    assert "outs: [models/onnx/ratio-1, models/onnx/ratio-2," in (root / "dvc.yaml").read_text()
    repro(root)
    assert publish(params, root).status == "published"
    dest = download("v0.1.0", 4, 2, repo=str(tmp_path / "origin.git"), out=tmp_path / "out")
    assert (dest / "weights.bin").read_bytes() == (root / "models/onnx/ratio-2/weights.bin").read_bytes()


def remote_object(tmp_path, path: Path) -> Path:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    stored = tmp_path / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
    stored.chmod(0o644)
    return stored


def test_tampered_remote_files_are_refused_and_nothing_is_written(tmp_path):
    root, params = make_project(tmp_path)
    repro(root)
    publish(params, root)
    folder = root / "models" / "onnx" / "ratio-1"
    model, manifest = remote_object(tmp_path, folder / "weights.bin"), remote_object(tmp_path, folder / "manifest.json")
    out = tmp_path / "out"
    model.write_bytes(b"a backdoored model")  # DVC does not re-hash what it downloads; we do
    with pytest.raises(ManifestError, match=r"weights.bin: sha256 .* does not match"):
        download("v0.1.0", 4, 1, repo=str(tmp_path / "origin.git"), out=out)
    assert not out.exists() or not any(out.rglob("*.onnx"))
    # the attacker rewrites the manifest to match: the record committed at the tag still says no
    forged = json.loads((folder / "manifest.json").read_text())
    forged["files"]["weights.bin"] = hashlib.sha256(b"a backdoored model").hexdigest()
    manifest.write_text(json.dumps(forged, indent=2))
    with pytest.raises(ManifestError, match=r"(weights.bin|manifest.json): sha256 .* does not match.*releases/v0.1.0.json"):
        download("v0.1.0", 4, 1, repo=str(tmp_path / "origin.git"), out=out)
    cli = CliRunner().invoke(app, ["download", "--version", "v0.1.0", "--layer", "4", "--repo",
                                   str(tmp_path / "origin.git"), "--out", str(out)])
    assert cli.exit_code == 1 and "does not match" in cli.output


def test_a_tampered_manifest_alone_is_refused(tmp_path):
    """The manifest is a released file like any other: one rewritten on the remote (here every model's Platt
    calibration, so served probabilities would lie) with every other file intact still lists the right files
    with the right hashes, so only the record's sha256 of manifest.json itself can refuse it."""
    root, params = make_project(tmp_path)
    repro(root)
    publish(params, root)
    folder = root / "models" / "onnx" / "ratio-1"
    stored = remote_object(tmp_path, folder / "manifest.json")
    forged = json.loads((folder / "manifest.json").read_text())
    for model in forged["models"]:
        model["calibration"] = {"method": "platt", "a": -50.0, "b": 10.0, "pairs": 5, "positives": 2}
    stored.write_text(json.dumps(forged, indent=2))
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=r"manifest.json: sha256 .* does not match.*releases/v0.1.0.json"):
        download("v0.1.0", 4, 1, repo=str(tmp_path / "origin.git"), out=out)
    assert not out.exists() or not any(out.rglob("manifest.json"))


def test_a_moved_tag_is_refused(tmp_path):
    root, params = make_project(tmp_path)
    repro(root)
    publish(params, root)
    (root / "README.md").write_text("later\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "later")
    git(root, "tag", "-f", "-a", "v0.1.0", "-m", "moved")  # same name, another commit
    git(root, "push", "-q", "-f", "origin", "v0.1.0")
    with pytest.raises(ReleaseError, match="tag was moved or the record altered"):
        download("v0.1.0", 4, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "out")


def test_republishing_a_version_is_refused_even_if_the_local_tag_is_gone(tmp_path):
    root, params = make_project(tmp_path, git_remote=False)
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    set_knobs(root, quality=0.6)
    repro(root)
    with pytest.raises(VersionError, match="v0.1.0 is already taken"):
        publish(params, root, version="v0.1.0")
    for tag in git(root, "tag").splitlines():
        git(root, "tag", "-d", tag)  # the remote's record still knows v0.1.0
    with pytest.raises(VersionError, match="v0.1.0 is already taken"):
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
    set_knobs(root, delta={"exit-04-ratio-2": -0.05})
    repro(root)
    with pytest.raises(GateFailed, match="gate failed: regressed configs exit-04-ratio-2"):
        publish(params, root)
    assert git(root, "rev-parse", "HEAD") == head
    assert sorted(t for t in git(root, "tag").splitlines() if "@" not in t) == ["v0.1.0"]
    assert sorted(p.name for p in (tmp_path / "dvc-remote" / "releases").iterdir()) == ["v0.1.0.json"]
    gate = json.loads((root / "reports" / "gate" / "gate.json").read_text())
    assert gate["regressions"] == ["exit-04-ratio-2"] and gate["baseline"]["version"] == "v0.1.0"
    cli = CliRunner().invoke(app, ["publish", "--repo", str(root), "-p", str(root / "params.yaml")])
    assert cli.exit_code == 1 and "gate failed" in cli.output
    # dropping an exit layer from the metrics is a regression too
    set_knobs(root, delta={}, drop=["exit-06-ratio-1"])
    repro(root)
    cli = CliRunner().invoke(app, ["gate", "--repo", str(root), "-p", str(root / "params.yaml")])
    assert cli.exit_code == 1 and "exit-06-ratio-1" in cli.output and "missing" in cli.output


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
    dvc(root, "push", "-A", "-r", "releases", check=False)  # skips (or fails on) revisions without the remote
    dvc(root, "push", "-T", "-r", "releases", check=False)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        new, lost = _missing_objects(repo, ["models/onnx"], "v0.0.1", "releases")
    assert new and not lost  # the pitfall, reproduced: both pushes left v0.0.1's models out

    with pytest.raises(Exception, match="v0.0.1 exists .* record .* missing"):
        publish(params, root)  # a hand-made release at origin has no record: never silently "first release"
    with caplog.at_level(logging.WARNING):
        published = publish(params, root, skip_gate=True)  # an explicit waiver, recorded
    assert published.version == "v0.0.2" and "back-filled" in caplog.text and "v0.0.1" in caplog.text
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.0.2.json").read_text())
    assert record["gate"]["waived"] is True and "WAIVED" in git(root, "log", "-1", "--format=%b")
    with contextlib.chdir(root), Repo(str(root)) as repo:
        assert _missing_objects(repo, ["models/onnx"], "v0.0.1", "releases") == (set(), set())

    # a hand-made tag has no release record committed: `download` refuses to vouch for its files
    # (its data was back-filled above, so plain DVC can still fetch it)
    with pytest.raises(ReleaseError, match="predates verifiable releases"):
        download("v0.0.1", 6, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "old")
    new = download("v0.0.2", 6, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "new")
    assert (new / "weights.bin").read_bytes().startswith(b"weights 1 data 1\n 1\n")
    # an explicit URL works too (e.g. a remote that moved)
    moved = tmp_path / "moved-remote"
    shutil.copytree(tmp_path / "dvc-remote", moved)
    download("v0.0.2", 4, 2, repo=str(tmp_path / "origin.git"), out=tmp_path / "explicit", remote_url=str(moved))


# --- policy, concurrency, interruption ------------------------------------------------------------


def test_the_release_under_test_cannot_set_its_own_policy(tmp_path):
    root, params = make_project(tmp_path, git_remote=False)
    repro(root)
    params_file = str(root / "params.yaml")
    for override in ("gate.max_drop_abs=.inf", "evaluation.measures=[R@10]", "gate.alpha=1.0",
                     f"release.remote_url={tmp_path / 'empty-remote'}", "release.git_remote=elsewhere"):
        cli = CliRunner().invoke(app, ["publish", "--repo", str(root), "-p", params_file, "-S", override])
        assert cli.exit_code == 1 and "refuses overrides of the release policy" in cli.output, cli.output
    loose = params.model_copy(update={"gate": params.gate.model_copy(update={"max_drop_abs": 1.0})})
    with pytest.raises(ReleaseError, match="params `gate` differs from the committed params.yaml"):
        publish(loose, root)
    # an empty release remote holds no baseline: the release would be gated as a first one
    elsewhere = params.model_copy(update={"release": params.release.model_copy(
        update={"remote_url": str(tmp_path / "empty-remote")})})
    with pytest.raises(ReleaseError, match="params `release.remote_url` differs from the committed"):
        publish(elsewhere, root)
    assert git(root, "tag") == "" and not (tmp_path / "dvc-remote" / "releases").exists()


def test_the_committed_policy_is_found_whatever_the_params_path(tmp_path):
    """``-p`` given as an absolute path, or relative to a working directory other than the repo root,
    still names the committed params.yaml: a committed stricter gate is kept, an uncommitted relaxation of
    it (back to the package defaults) is refused."""
    root, params = make_project(tmp_path, git_remote=False)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["gate"]["max_drop_abs"] = 0.0  # a reviewed, stricter gate than the default
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(root, "commit", "-q", "-am", "stricter gate")
    repro(root)
    with contextlib.chdir(tmp_path):
        for params_file in (str(root / "params.yaml"), "project/params.yaml"):
            cli = CliRunner().invoke(app, ["publish", "--dry-run", "--repo", str(root), "-p", params_file])
            assert cli.exit_code == 0 and '"status": "dry_run"' in cli.output, cli.output
    raw["gate"]["max_drop_abs"] = 0.02  # an uncommitted edit back to the default: looser
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with contextlib.chdir(tmp_path):
        for params_file in (str(root / "params.yaml"), "project/params.yaml"):
            cli = CliRunner().invoke(app, ["publish", "--dry-run", "--repo", str(root), "-p", params_file])
            assert cli.exit_code == 1 and "differs from the committed" in cli.output, cli.output


def test_a_release_commit_that_fails_leaves_the_working_tree_as_it_was(tmp_path):
    """A release commit refused (here by a hook; in CI typically a missing git identity) gives the version
    back and leaves no release record, card or .dvc/config edit behind, so the next publish is not refused
    for "foreign changes" and succeeds."""
    root, params = make_project(tmp_path, git_remote=False)
    repro(root)
    before = git(root, "status", "--porcelain")
    hook = root / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(RevisionError, match="git commit"):
        publish(params, root)
    gate_report = f"?? {params.paths.gate_report.split('/')[0]}/"  # the gate's own report stays, for reading
    after = [line for line in git(root, "status", "--porcelain").splitlines() if line != gate_report]
    assert after == before.splitlines() and git(root, "tag") == ""
    hook.unlink()
    assert publish(params, root).version == "v0.1.0"


def test_remote_plugins_and_credentials(tmp_path):
    from matryoshka_reranker.release.registry import check_remote_plugin
    from matryoshka_reranker.release.revisions import redact

    with pytest.raises(ReleaseError, match="pip install dvc-s3"):
        check_remote_plugin("s3://user:secret@bucket/releases")
    try:
        check_remote_plugin("s3://user:secret@bucket/releases")
    except ReleaseError as err:
        assert "secret" not in str(err)
    check_remote_plugin(str(tmp_path))  # local paths need no plugin
    assert redact("https://alice:hunter2@example.com/repo.git") == "https://***:***@example.com/repo.git"


PUBLISH_SCRIPT = """
import sys, yaml
from matryoshka_reranker.config import parse_params
from matryoshka_reranker.release.registry import publish
params = parse_params(yaml.safe_load(open(sys.argv[1] + "/params.yaml")))
print("RESULT", publish(params, sys.argv[1], version=sys.argv[2] if len(sys.argv) > 2 else None).version, flush=True)
"""


def test_two_concurrent_publishes_give_exactly_one_release(tmp_path):
    import subprocess
    import sys

    root, params = make_project(tmp_path, git_remote=False)
    repro(root)
    clone = tmp_path / "clone"  # a second checkout of the same state, publishing to the same remote
    shutil.copytree(root, clone)
    script = tmp_path / "publish.py"
    script.write_text(PUBLISH_SCRIPT)
    env = {**__import__("os").environ, "PYTHONPATH": f"{Path(__file__).resolve().parents[1] / 'src'}"}
    procs = [subprocess.Popen([sys.executable, str(script), str(path), "v0.1.0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for path in (root, clone)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outputs
    loser = outputs[codes.index(1)]
    assert "already claimed" in loser or "already taken" in loser, loser
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["status"] == "published"  # the winner's record survived the loser's rollback
    winner, other = (root, clone) if codes[0] == 0 else (clone, root)
    assert record["commit"] == git(winner, "rev-parse", "v0.1.0^{commit}")
    assert git(other, "tag", "-l", "v0.1.0") == ""  # the loser tagged nothing
    # in one checkout, a second publish while one runs is refused by the lock (a live holder's pid)
    lock = Path(git(other, "rev-parse", "--absolute-git-dir")) / "matryoshka-publish.lock"
    lock.write_text(str(__import__("os").getpid()))  # held by a live process
    with pytest.raises(ReleaseError, match="another `matryoshka publish`"):
        publish(params, other, version="v0.2.0")
    lock.write_text("999999")  # a dead holder: its lock is taken over
    with pytest.raises(VersionError):
        publish(params, other, version="v0.1.0")


def test_an_interrupted_publish_is_completed_by_the_next_run(tmp_path, monkeypatch):
    from matryoshka_reranker.release import registry

    root, params = make_project(tmp_path)
    repro(root)
    real_push = registry.push_release_data
    calls = {"n": 0}

    def killed_on_second_push(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the release commit and tags, before the data is proven at the tag
            raise registry.PublishInterrupted("publish interrupted by signal 15")
        return real_push(*args, **kwargs)

    monkeypatch.setattr(registry, "push_release_data", killed_on_second_push)
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    assert git(root, "log", "-1", "--format=%s") == "Release v0.1.0"
    assert "v0.1.0" not in git(root, "ls-remote", "--tags", "origin")  # not pushed yet
    monkeypatch.setattr(registry, "push_release_data", real_push)
    resumed = publish(params, root)
    assert resumed.status == "published" and resumed.version == "v0.1.0"  # completed, not "unchanged"
    assert "refs/tags/v0.1.0" in git(root, "ls-remote", "--tags", "origin")
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["status"] == "published" and record["commit"] == resumed.commit
    assert publish(params, root).status == "unchanged"


def test_a_dry_run_does_not_complete_an_interrupted_publish(tmp_path, monkeypatch):
    """``publish --dry-run`` ("check and gate only") with a pending journal reports what a real run
    would do: it pushes, tags and records nothing."""
    from matryoshka_reranker.release import registry

    root, params = make_project(tmp_path)
    repro(root)
    real_push = registry.push_release_data

    def killed(*args, **kwargs):
        raise registry.PublishInterrupted("publish interrupted by signal 15")

    monkeypatch.setattr(registry, "push_release_data", killed)  # after the release commit
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    monkeypatch.setattr(registry, "push_release_data", real_push)
    dry = publish(params, root, dry_run=True)
    assert dry.status == "dry_run" and dry.version == "v0.1.0"
    assert git(root, "tag") == "" and "v0.1.0" not in git(root, "ls-remote", "--tags", "origin")
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["status"] == "claimed" and "commit" not in record
    resumed = publish(params, root)  # the journal is still there: the real run completes the release
    assert resumed.status == "published" and resumed.version == "v0.1.0"


def test_a_publish_interrupted_right_after_its_claim_leaves_no_orphan_record(tmp_path, monkeypatch):
    """A signal between the remote claim and the journal must not leave a claimed version that no
    journal names (the next publish would skip it and the gate would take it as the last release)."""
    from matryoshka_reranker.release import records, registry

    root, params = make_project(tmp_path)
    repro(root)
    real_claim = records.RecordStore.claim

    def claim_then_signal(self, *args, **kwargs):
        nonce = real_claim(self, *args, **kwargs)
        raise registry.PublishInterrupted("publish interrupted by signal 15")  # the claim is written

    monkeypatch.setattr(records.RecordStore, "claim", claim_then_signal)
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    assert not (tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").exists()  # rolled back
    monkeypatch.setattr(records.RecordStore, "claim", real_claim)
    assert publish(params, root).version == "v0.1.0"  # not v0.1.1: nothing was left behind


def test_fetch_release_downloads_once_and_reuses_a_verified_cache(published, tmp_path, monkeypatch):
    from matryoshka_reranker.release import registry

    base, root, params, result = published
    cache = tmp_path / "cache"
    version, folders = registry.fetch_release("latest", repo=str(base / "origin.git"), exit_layers=[6], ratios=[2],
                                              cache=cache)
    assert version == "v0.1.0" and [f.name for f in folders] == ["ratio-2"]
    assert folders[0] == cache / "v0.1.0" / "ratio-2"
    both = registry.fetch_release("v0.1.0", repo=str(base / "origin.git"), ratios=[2], cache=cache)[1]
    assert both == folders  # exits 4 and 6 of ratio 2: one folder, fetched once
    calls = []
    monkeypatch.setattr(registry, "download", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    again = registry.fetch_release("v0.1.0", repo=str(base / "origin.git"), exit_layers=[6], ratios=[2], cache=cache)
    assert again == (version, folders) and calls == []  # reused: it still verifies
    (folders[0] / "weights.bin").write_bytes(b"corrupted in the cache")
    monkeypatch.undo()
    refetched = registry.fetch_release("v0.1.0", repo=str(base / "origin.git"), exit_layers=[6], ratios=[2],
                                       cache=cache)[1][0]
    assert (refetched / "weights.bin").read_bytes() == (root / "models/onnx/ratio-2/weights.bin").read_bytes()
    with pytest.raises(ReleaseError, match="no exit model for exit_layers=\\[9\\]"):
        registry.fetch_release("v0.1.0", repo=str(base / "origin.git"), exit_layers=[9], cache=cache)


def test_an_exit_specialist_is_released_downloaded_and_gated_beside_the_shared_exits(tmp_path):
    """``specialist.exits``: the specialist's folder is one more artifact; ``download(variant=...)`` and
    ``fetch_release(shared=False)`` get it alone; its ``spearman_vs_float`` is not a measure the next
    release's gate asks of every config."""
    from matryoshka_reranker.release.registry import fetch_release

    root, params = make_project(tmp_path, specialists=[4])
    assert "exit-04-ratio-1-specialist:" in (root / "dvc.yaml").read_text()
    repro(root)
    assert publish(params, root).status == "published"
    origin = str(tmp_path / "origin.git")
    dest = download("v0.1.0", 4, 1, repo=origin, out=tmp_path / "out", variant="specialist")
    assert dest.name == "exit-04-ratio-1-specialist"
    assert (dest / "weights.bin").read_bytes() == (root / "models/onnx/exit-04-ratio-1-specialist/weights.bin").read_bytes()
    cache = tmp_path / "cache"
    _, alone = fetch_release("v0.1.0", origin, [4], [1], cache=cache, variant="specialist", shared=False)
    _, both = fetch_release("v0.1.0", origin, [4], [1], cache=cache, variant="specialist")
    _, plain = fetch_release("v0.1.0", origin, [4], [1], cache=cache)
    assert [f.name for f in alone] == ["exit-04-ratio-1-specialist"] and [f.name for f in plain] == ["ratio-1"]
    assert sorted(f.name for f in both) == ["exit-04-ratio-1-specialist", "ratio-1"]
    set_knobs(root, model_seed=1)  # new weights; the specialist agrees less with its float config
    repro(root)
    second = publish(params, root)
    assert second.status == "published" and second.version == "v0.1.1"


def test_latest_is_the_newest_finished_release_not_one_whose_publish_stopped(tmp_path, monkeypatch):
    """A publish stopped after pushing its tags but before its remote record was completed leaves the
    tag at origin and the record ``claimed``: "latest" is the release before it, and asking for the
    unfinished one by name says so (not "the tag was moved")."""
    from matryoshka_reranker.release import records, registry

    root, params = make_project(tmp_path)
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    set_knobs(root, model_seed=1)
    repro(root)

    def interrupted(self, *args, **kwargs):
        raise registry.PublishInterrupted("publish interrupted by signal 15")

    monkeypatch.setattr(records.RecordStore, "update", interrupted)  # after the tags were pushed
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    monkeypatch.undo()
    origin = str(tmp_path / "origin.git")
    assert "refs/tags/v0.1.1" in git(root, "ls-remote", "--tags", "origin")
    assert json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.1.json").read_text())["status"] == "claimed"
    version, folders = registry.fetch_release("latest", repo=origin, exit_layers=[4], ratios=[1],
                                              cache=tmp_path / "cache")
    assert version == "v0.1.0" and (folders[0] / "weights.bin").read_bytes().endswith(b" 0\n")
    with pytest.raises(ReleaseError, match="v0.1.1 is not finished"):
        download("v0.1.1", 4, 1, repo=origin, out=tmp_path / "out")
    assert publish(params, root).version == "v0.1.1"  # the next run completes it; then it is the latest
    assert registry.fetch_release("latest", repo=origin, exit_layers=[4], ratios=[1], cache=tmp_path / "cache")[0] \
        == "v0.1.1"


def test_an_interrupted_publish_is_abandoned_until_it_is_public(tmp_path, monkeypatch):
    """``publish --abandon`` gives up a pending release whose commit HEAD has moved past (completing it is
    refused then): the record stays, marked abandoned, so the version is never reused, the gate and
    ``latest`` skip it and a download of it is refused; its local tags go. A release whose tags reached
    the git remote is public and is not abandoned."""
    from matryoshka_reranker.release import records, registry

    root, params = make_project(tmp_path)
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    params_file = str(root / "params.yaml")
    cli = CliRunner().invoke(app, ["publish", "--abandon", "--repo", str(root), "-p", params_file])
    assert cli.exit_code != 0 and "nothing to abandon" in cli.output
    set_knobs(root, model_seed=1)
    repro(root)

    def killed(*args, **kwargs):
        raise registry.PublishInterrupted("publish interrupted by signal 15")

    monkeypatch.setattr(registry, "push_release_data", killed)  # after the release commit, before its tags
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    monkeypatch.undo()
    release_commit = git(root, "rev-parse", "HEAD")
    git(root, "tag", "v0.1.1", release_commit)  # as if it had tagged before the signal
    (root / "NOTES.md").write_text("moved on\n")
    git(root, "add", "NOTES.md")
    git(root, "commit", "-q", "-m", "HEAD moves past the release commit")
    with pytest.raises(ReleaseError, match="publish --abandon"):
        publish(params, root)
    cli = CliRunner().invoke(app, ["publish", "--abandon", "--repo", str(root), "-p", params_file])
    assert cli.exit_code == 0, cli.output
    result = json.loads(cli.stdout.strip().splitlines()[-1])
    assert result["status"] == "abandoned" and result["version"] == "v0.1.1" and result["commit"] == release_commit
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.1.json").read_text())
    assert record["status"] == "abandoned" and record["commit"] == release_commit
    assert "v0.1.1" not in git(root, "tag").split() and git(root, "rev-parse", "HEAD") != release_commit
    store = records.RecordStore.from_params(params, root)
    assert store.latest_version() == "v0.1.0" and "v0.1.1" in store.taken_versions()
    with pytest.raises(GateError, match="v0.1.1 is not a release"):
        run_gate(params, root, baseline="v0.1.1")
    git(root, "tag", "v0.1.1", release_commit)
    git(root, "push", "-q", "origin", "refs/tags/v0.1.1")  # a tag pushed by hand: the record still refuses it
    with pytest.raises(ReleaseError, match="v0.1.1 was abandoned"):
        download("v0.1.1", 4, 1, repo=str(tmp_path / "origin.git"), out=tmp_path / "out")
    git(root, "push", "-q", "origin", ":refs/tags/v0.1.1")
    git(root, "tag", "-d", "v0.1.1")
    with pytest.raises(ReleaseError, match="no interrupted publish"):
        registry.abandon(params, root)

    # the next release takes the next number; the gate's baseline is v0.1.0, not the abandoned one
    set_knobs(root, model_seed=2)
    repro(root)
    nxt = publish(params, root)
    assert nxt.version == "v0.1.2" and nxt.gate.baseline_version == "v0.1.0"

    # a release whose tags reached origin is public: refused, and publish still completes it
    set_knobs(root, model_seed=3)
    repro(root)
    monkeypatch.setattr(records.RecordStore, "update", lambda self, *a, **k: killed())  # after the git push
    with pytest.raises(registry.PublishInterrupted):
        publish(params, root)
    monkeypatch.undo()
    with pytest.raises(ReleaseError, match="v0.1.3 is already pushed to origin: it is public"):
        registry.abandon(params, root)
    assert publish(params, root).version == "v0.1.3"


def test_download_latest_is_the_newest_finished_release(published, tmp_path):
    """``matryoshka download --version latest`` (README: "`latest` is the newest release whose publish
    finished") resolves the version as ``serve --version latest`` does, and lands under its name."""
    base, root, params, result = published
    cli = CliRunner().invoke(app, ["download", "--version", "latest", "--layer", "4", "--ratio", "1",
                                   "--repo", str(base / "origin.git"), "--out", str(tmp_path / "out")])
    assert cli.exit_code == 0, cli.output
    dest = tmp_path / "out" / "v0.1.0" / "ratio-1"
    assert cli.stdout.strip().splitlines()[-1] == str(dest)
    verify_manifest(dest)


KILL_AT_COMMIT = """
import os, signal, sys, yaml
from matryoshka_reranker.config import parse_params
from matryoshka_reranker.release import registry
real = registry.git
def git(root, *args, **kwargs):
    if args[:1] == ("commit",):
        if sys.argv[2] == "after":  # the release commit is made; the journal does not name it yet
            real(root, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root, *args, **kwargs)
registry.git = git
registry.publish(parse_params(yaml.safe_load(open(sys.argv[1] + "/params.yaml"))), sys.argv[1])
"""


@pytest.mark.parametrize("when", ["before", "after", "signal-after"])
def test_a_publish_stopped_at_its_release_commit_is_recovered_by_the_next_runs(tmp_path, monkeypatch, when):
    """SIGKILL (OOM killer, Prefect's forced kill, a CI timeout) at ``git commit`` leaves the remote config,
    release record and card it wrote (staged) in the tree; a kill or signal right after the commit leaves a
    release commit the journal does not name. Either way "run publish again" must work: one release, one
    ``Release`` commit, a clean tree (was: refused for ever as "uncommitted changes that `dvc repro` did
    not make: .dvc/config, releases/v0.1.0.json")."""
    import os
    import subprocess
    import sys

    from matryoshka_reranker.release import registry

    root, params = make_project(tmp_path)
    repro(root)
    if when == "signal-after":
        real = registry.git

        def git_then_signal(where, *args, **kwargs):
            out = real(where, *args, **kwargs)
            if args[:1] == ("commit",):
                raise registry.PublishInterrupted("publish interrupted by signal 15")
            return out

        monkeypatch.setattr(registry, "git", git_then_signal)
        with pytest.raises(registry.PublishInterrupted):
            publish(params, root)
        monkeypatch.undo()
    else:
        script = tmp_path / "kill_at_commit.py"
        script.write_text(KILL_AT_COMMIT)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        killed = subprocess.run([sys.executable, str(script), str(root), when], env=env, capture_output=True, text=True)
        assert killed.returncode == -9, killed.stdout + killed.stderr
    results = []
    for _ in range(2):  # the first run may only give the claim back ("run publish again")
        try:
            results.append(publish(params, root))
            break
        except ReleaseError as err:
            assert "run publish again" in str(err), err
    assert results and results[-1].status == "published" and results[-1].version == "v0.1.0"
    assert git(root, "status", "--porcelain") == ""
    assert [s for s in git(root, "log", "--format=%s").splitlines() if s.startswith("Release")] == ["Release v0.1.0"]
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["status"] == "published" and record["commit"] == git(root, "rev-parse", "v0.1.0^{commit}")


def test_a_checkout_behind_its_git_remote_is_refused_before_claiming_a_version(tmp_path):
    """Another checkout released since this one was last pulled: the release commit could never be pushed
    (non-fast-forward), so publishing must stop before it claims a version, commits or tags (was: v0.1.2
    claimed for ever, tagged locally, and every rerun failing in `git push --atomic`)."""
    root, params = make_project(tmp_path)
    repro(root)
    assert publish(params, root).version == "v0.1.0"
    other = tmp_path / "other"  # a second checkout of v0.1.0, with its DVC cache
    shutil.copytree(root, other)
    set_knobs(root, model_seed=1)
    repro(root)
    assert publish(params, root).version == "v0.1.1"  # main at origin moved on
    set_knobs(other, model_seed=2)
    repro(other)
    head = git(other, "rev-parse", "HEAD")
    with pytest.raises(ReleaseError, match=r"origin.*main.*(pull|merge)"):
        publish(params, other)
    assert git(other, "rev-parse", "HEAD") == head and "v0.1.2" not in git(other, "tag").splitlines()
    assert sorted(p.name for p in (tmp_path / "dvc-remote" / "releases").glob("*.json")) == ["v0.1.0.json",
                                                                                            "v0.1.1.json"]
