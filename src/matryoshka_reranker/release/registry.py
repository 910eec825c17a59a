"""Publish gated releases of the exported exit models, and download them back by version.

A release is one git commit holding the reproduced pipeline state (``dvc.lock``, params, metrics),
tagged ``vX.Y.Z`` (see ``versions``) plus one DVC model-registry tag per exit model
(``exit-08-ratio-1@vX.Y.Z``, so ``dvc artifacts get`` works), with the ONNX folders in the DVC
remote named by ``release.remote_name``. ``publish`` refuses unless:

- ``dvc status`` is clean (every stage reproduced) and the only uncommitted changes are what
  ``dvc repro`` wrote: ``dvc.lock``, the params files it records, git-tracked (``cache: false``)
  outputs and ``.gitignore`` files, plus the gate report. ``publish`` commits exactly those
  ("Release vX"); any other change (code, dvc.yaml, .dvc/config) must be committed first.
- ``dvc.yaml``'s ``artifacts:`` match ``export.exit_layers x export.ratios`` (``matryoshka artifacts``).
- every exported folder matches its ``manifest.json`` sha256s, and the gate passes.
- the version is new: no local tag, no git-remote tag, no record in the DVC remote (``releases/``).

The remote is added to ``.dvc/config`` (local paths made absolute) and committed *before* tagging:
a tag whose commit lacks the remote config cannot be fetched later. Data is pushed, then checked
object by object in the remote for the tagged commit, because ``dvc push -A/-T`` silently skip
revisions whose config lacks the remote; earlier release tags are back-filled the same way.
If HEAD is already a release and nothing changed, publishing is a no-op ("unchanged").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from ..core.atomic import atomic_dir, atomic_file, sha256_file
from ..config import Params
from ..serving.artifacts import NAME_RE, ModelIntegrityError, config_name, read_manifest
from .gate import GateReport, read_metrics, run_gate
from .revisions import (
    absolute_remote_url, dirty_paths, git, list_tags, open_at, repo_root, rev_commit,
)
from .versions import check_new_version, next_version, parse_version, release_versions

logger = logging.getLogger(__name__)

RECORDS_DIR = "releases"  # inside the DVC remote: one JSON record per published version
ARTIFACT_RE = NAME_RE


class ReleaseError(RuntimeError):
    """Publishing or downloading was refused or failed; nothing was published or overwritten."""


class ManifestError(ReleaseError):
    """A model folder does not match its manifest (tampered, truncated or incomplete)."""


# --- exit models as DVC artifacts ---------------------------------------------------------------

def artifact_name(exit_layer: int, ratio: int) -> str:
    """DVC artifact name of one exit model: its config name ``exit-08-ratio-1`` (GTO allows no ``_@#``)."""
    return config_name(exit_layer, ratio)


def expected_artifacts(params: Params) -> dict[str, dict]:
    """The ``artifacts:`` entries that ``export.exit_layers x export.ratios`` call for."""
    onnx = PurePosixPath(params.paths.onnx)
    return {
        artifact_name(k, r): {
            "path": str(onnx / config_name(k, r)),
            "type": "model",
            "desc": f"Matryoshka re-ranker, ONNX, exit layer {k}, token compression ratio {r}",
            "labels": ["onnx", "reranker", f"exit-{k}", f"ratio-{r}"],
            "meta": {"exit_layer": k, "compress_ratio": r},
        }
        for k in params.export.exit_layers for r in params.export.ratios
    }


def artifacts_out_of_sync(params: Params, root: str | Path = ".") -> list[str]:
    """Differences between dvc.yaml's exit-model artifacts and params (empty when in sync)."""
    declared = (_load_dvc_yaml(Path(root) / "dvc.yaml").get("artifacts") or {})
    ours = {n: a for n, a in declared.items() if ARTIFACT_RE.match(n)}
    expected = expected_artifacts(params)
    problems = [f"missing artifact {n}" for n in expected if n not in ours]
    problems += [f"artifact {n} is not in export.exit_layers x export.ratios" for n in ours if n not in expected]
    for name in set(ours) & set(expected):
        for key in ("path", "type"):
            if (ours[name] or {}).get(key) != expected[name][key]:
                problems.append(f"artifact {name}: {key} is {(ours[name] or {}).get(key)!r}, "
                                f"expected {expected[name][key]!r}")
    return problems


def sync_artifacts(params: Params, root: str | Path = ".") -> bool:
    """Rewrites the exit-model entries of dvc.yaml ``artifacts:``; everything else is kept as is."""
    from ruamel.yaml import YAML

    path = Path(root) / "dvc.yaml"
    if not path.exists():
        raise ReleaseError(f"{path}: no dvc.yaml to declare the exit models in")
    ryaml = YAML()  # round-trip: comments, order and quoting of the rest survive
    ryaml.preserve_quotes = True
    ryaml.width = 4096
    doc = ryaml.load(path.read_text(encoding="utf-8")) or {}
    artifacts = doc.get("artifacts") or {}
    before = json.dumps(dict(artifacts), sort_keys=True, default=str)
    for name in [n for n in artifacts if ARTIFACT_RE.match(n)]:
        del artifacts[name]
    artifacts.update(expected_artifacts(params))
    doc["artifacts"] = artifacts
    if json.dumps(dict(doc["artifacts"]), sort_keys=True, default=str) == before:
        return False
    buffer = io.StringIO()
    ryaml.dump(doc, buffer)
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    return True


def _load_dvc_yaml(path: Path) -> dict:
    if not path.exists():
        raise ReleaseError(f"{path}: no dvc.yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


# --- manifests ----------------------------------------------------------------------------------

def verify_manifest(folder: str | Path) -> dict:
    """Checks every file of ``folder`` against ``manifest.json`` (``serving.artifacts``): files listed
    but absent, present but unlisted, or with another sha256 raise ``ManifestError``."""
    try:
        return read_manifest(folder, verify=True)
    except ModelIntegrityError as err:
        raise ManifestError(str(err)) from None


# --- publish ------------------------------------------------------------------------------------

@dataclass
class PublishResult:
    status: str  # published | unchanged | dry_run
    version: str | None
    commit: str | None
    remote_url: str
    tags: list[str] = field(default_factory=list)
    pushed: int = 0
    gate: GateReport | None = None


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReleaseError(f"dvc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def pipeline_changes(root: Path, params: Params) -> list[str]:
    """The uncommitted files ``dvc repro`` produced; refuses if the pipeline or the tree is not clean."""
    from dvc.repo import Repo

    if not (root / "dvc.yaml").exists():
        raise ReleaseError(f"{root}: no dvc.yaml; nothing to release")
    with contextlib.chdir(root), Repo(str(root)) as repo:
        stale = repo.status()
        if stale:
            raise ReleaseError("pipeline is not reproduced (`dvc status` is not clean): "
                               + ", ".join(sorted(stale)) + "; run `dvc repro` first")
        owned = {"dvc.lock", params.paths.gate_report}
        for stage in repo.index.stages:
            owned |= {os.path.relpath(out.fs_path, root) for out in stage.outs if not out.use_cache}
    lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").exists() else {}
    for stage in (lock or {}).get("stages", {}).values():
        owned |= set((stage.get("params") or {}).keys())
    changes, foreign = [], []
    for status, path in dirty_paths(root):
        if _under(path, owned) or PurePosixPath(path).name == ".gitignore":
            changes.append(path)
        elif status != "??":
            foreign.append(path)
    if foreign:
        raise ReleaseError("uncommitted changes that `dvc repro` did not make: " + ", ".join(foreign)
                           + "; commit or revert them before publishing")
    return changes


def ensure_remote(root: Path, name: str, url: str) -> str:
    """Adds (or re-points) the release remote in ``.dvc/config`` (repo level, committed). Returns its URL."""
    from dvc.repo import Repo

    url = absolute_remote_url(url, root)
    with Repo(str(root)) as repo:
        config = repo.config.read("repo")
    current = (config.get("remote") or {}).get(name)
    if current is None:
        _dvc(root, "remote", "add", name, url)
        logger.info("added DVC remote %r -> %s", name, url)
    elif absolute_remote_url(current.get("url", ""), root / ".dvc") != url:
        logger.warning("DVC remote %r pointed to %s; setting it to %s (params.yaml)", name, current.get("url"), url)
        _dvc(root, "remote", "modify", name, "url", url)
    if not (config.get("core") or {}).get("remote"):
        _dvc(root, "remote", "default", name)
    return url


def recorded_versions(root: Path, remote_name: str) -> list[str]:
    """Versions with a record in the DVC remote (empty when the remote is not configured or empty)."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        if remote_name not in repo.config["remote"]:
            return []
        try:
            remote = repo.cloud.get_remote(remote_name)
        except NoRemoteError:
            return []
        folder = remote.fs.join(remote.path, RECORDS_DIR)
        if not remote.fs.exists(folder):
            return []
        names = [remote.fs.name(p) for p in remote.fs.ls(folder, detail=False)]
    return [n.removesuffix(".json") for n in names if n.endswith(".json")]


def existing_versions(root: Path, params: Params) -> set[str]:
    versions = set(release_versions(list_tags(root))) | set(recorded_versions(root, params.release.remote_name))
    if params.release.git_remote:
        versions |= set(release_versions(list_tags(git(root, "remote", "get-url", params.release.git_remote))))
    return versions


def _missing_objects(repo, targets: list[str], rev: str, remote: str):
    """Objects the data at ``rev`` needs that the remote lacks: (pushable from the cache, lost)."""
    used = repo.used_objs(targets, revs=[rev], remote=remote, push=True, force=True)
    objs = set().union(*(ids for odb, ids in used.items() if odb is None))
    status = repo.cloud.status(objs, remote=remote)
    return status.new, status.missing


def push_release_data(root: Path, targets: list[str], remote: str, rev: str, backfill: list[str] = ()) -> int:
    """Pushes ``targets`` for the workspace and ``rev`` and proves the remote holds every object of ``rev``.

    ``backfill`` revisions (earlier releases) get their missing objects pushed too, best effort.
    """
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        pushed = repo.push(targets=targets, remote=remote)
        new, lost = _missing_objects(repo, targets, rev, remote)
        if new:  # what `dvc push` skipped for this revision
            result = repo.cloud.push(new, remote=remote)
            pushed += len(result.transferred)
            new, lost = _missing_objects(repo, targets, rev, remote)
        if new or lost:
            names = sorted({h.obj_name or h.value for h in (*new, *lost)})
            raise ReleaseError(f"DVC remote {remote!r} lacks data of {rev} after pushing: {', '.join(names)}")
        for old in backfill:
            try:
                new, lost = _missing_objects(repo, targets, old, remote)
                if new:
                    pushed += len(repo.cloud.push(new, remote=remote).transferred)
                    logger.warning("back-filled %d objects of earlier release %s into remote %r", len(new), old, remote)
                if lost:
                    logger.warning("earlier release %s: %d objects are neither cached here nor in remote %r",
                                   old, len(lost), remote)
            except Exception as err:  # noqa: BLE001 - an old release must not block a new one
                logger.warning("could not check earlier release %s in remote %r: %s", old, remote, err)
    return pushed


def _release_targets(root: Path, params: Params) -> list[str]:
    """The DVC outputs a release stores in the remote: whole outputs overlapping ``paths.onnx``
    (one folder output, or one output per exit model), plus the metrics if DVC caches them."""
    from dvc.repo import Repo

    def overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
        return a == b or a in b.parents or b in a.parents

    onnx, metrics = PurePosixPath(params.paths.onnx), PurePosixPath(params.paths.metrics)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        outs = [PurePosixPath(os.path.relpath(out.fs_path, root)) for stage in repo.index.stages
                for out in stage.outs if out.use_cache]
    models = [str(out) for out in outs if overlaps(out, onnx)]
    if not models:
        raise ReleaseError(f"no DVC-cached output holds {params.paths.onnx} (paths.onnx); the export stage "
                           "must declare it under `outs:`")
    return models + [str(out) for out in outs if overlaps(out, metrics)]


def verify_exports(root: Path, params: Params) -> dict[str, Path]:
    """Every configured exit model folder, each checked against its manifest."""
    folders = {}
    for name, artifact in expected_artifacts(params).items():
        folder = root / artifact["path"]
        if not folder.is_dir():
            raise ReleaseError(f"{folder}: exported model folder missing (export.exit_layers x export.ratios)")
        verify_manifest(folder)
        folders[name] = folder
    return folders


def publish(params: Params, repo: str | Path = ".", version: str | None = None, dry_run: bool = False,
            skip_gate: bool = False) -> PublishResult:
    """Gate, commit the reproduced state, push the exit models, tag. See the module docstring."""
    root = repo_root(repo)
    remote_name = params.release.remote_name
    remote_url = absolute_remote_url(params.release.remote_url, root)
    problems = artifacts_out_of_sync(params, root)
    if problems:
        raise ReleaseError("dvc.yaml artifacts do not match params.yaml (run `matryoshka artifacts`): "
                           + "; ".join(problems))
    changes = pipeline_changes(root, params)
    head = rev_commit(root, "HEAD")
    local_tags = list_tags(root)
    head_releases = [t for t in release_versions(local_tags) if rev_commit(root, t) == head]
    if head_releases and not [p for p in changes if not _under(p, {params.paths.gate_report})]:
        if version is not None and version not in head_releases:
            raise ReleaseError(f"HEAD is already release {head_releases[-1]} and nothing changed; "
                               f"not releasing it again as {version}")
        logger.info("HEAD is already release %s and nothing changed: nothing to publish", head_releases[-1])
        return PublishResult("unchanged", head_releases[-1], head, remote_url)
    verify_exports(root, params)
    targets = _release_targets(root, params)
    existing = existing_versions(root, params)
    version = check_new_version(version or next_version(existing, params.release.version_scheme), existing)

    report = run_gate(params, root)
    if not report.passed:
        if not skip_gate:
            raise ReleaseError(f"gate failed: regressed configs {', '.join(report.regressions)}; "
                               f"see {params.paths.gate_report}/gate.md. Nothing was published")
        logger.warning("gate failed (%s) but skip_gate is set: publishing anyway", ", ".join(report.regressions))
    if dry_run:
        logger.info("dry run: would publish %s with %d changed files", version, len(changes))
        return PublishResult("dry_run", version, head, remote_url, gate=report)

    # 1. remote config + reproduced state in one commit, before any tag exists
    ensure_remote(root, remote_name, params.release.remote_url)
    to_add = sorted(set(changes) | {".dvc/config", params.paths.gate_report})
    git(root, "add", "-A", "--", *[p for p in to_add if (root / p).exists() or p in changes])
    if git(root, "diff", "--cached", "--name-only"):
        git(root, "commit", "-q", "-m", f"Release {version}", "-m", _commit_body(params, report))
    commit = rev_commit(root, "HEAD")

    # 2. data into the remote, proven present for this commit (and back-filled for older releases)
    older = [t for t in release_versions(local_tags) if parse_version(t) < parse_version(version)]
    pushed = push_release_data(root, targets, remote_name, "HEAD", backfill=older)

    # 3. claim the version in the remote, then tag: the release and one model-registry tag per exit
    #    model. Claim and tags are undone if anything below fails (pushed data is harmless).
    record = _write_record(root, params, version, commit, report, skip_gate)
    tags = [version] + [f"{name}@{version}" for name in expected_artifacts(params)]
    message = f"Release {version}" + (" (gate skipped)" if skip_gate and not report.passed else "")
    created = []
    try:
        for tag in tags:
            git(root, "tag", "-a", tag, "-m", message, commit)
            created.append(tag)
        push_release_data(root, targets, remote_name, version)  # resolvable *at the tag*
        if params.release.git_remote:
            branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
            refs = ([f"HEAD:refs/heads/{branch}"] if branch != "HEAD" else []) + [f"refs/tags/{t}" for t in tags]
            git(root, "push", "--atomic", params.release.git_remote, *refs)
    except Exception:
        for tag in created:
            git(root, "tag", "-d", tag, check=False)
        _remove_record(root, params.release.remote_name, record)
        raise
    logger.info("published %s (commit %s) to %s: %d objects pushed", version, commit[:12], remote_url, pushed)
    return PublishResult("published", version, commit, remote_url, tags=tags, pushed=pushed, gate=report)


def _commit_body(params: Params, report: GateReport) -> str:
    baseline = report.baseline_version or "none (first release)"
    return (f"Gate: {'passed' if report.passed else 'FAILED'} against {baseline}; "
            f"exits {params.export.exit_layers} x ratios {params.export.ratios}.")


def _write_record(root: Path, params: Params, version: str, commit: str, report: GateReport,
                  skip_gate: bool) -> str:
    """Claims ``releases/<version>.json`` in the DVC remote (its own list of used versions); returns its path."""
    from dvc.repo import Repo

    record = {
        "version": version, "commit": commit,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "artifacts": {n: a["path"] for n, a in expected_artifacts(params).items()},
        "gate": {"passed": report.passed, "skipped": skip_gate and not report.passed,
                 "baseline": report.baseline_version, "regressions": report.regressions},
        "metrics": read_metrics(root / params.paths.metrics).get("configs", {}),
    }
    with contextlib.chdir(root), Repo(str(root)) as repo:
        remote = repo.cloud.get_remote(params.release.remote_name)
        folder = remote.fs.join(remote.path, RECORDS_DIR)
        path = remote.fs.join(folder, f"{version}.json")
        if remote.fs.exists(path):
            raise ReleaseError(f"remote already records {version}; released versions are immutable")
        remote.fs.makedirs(folder, exist_ok=True)
        remote.fs.pipe_file(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def _remove_record(root: Path, remote_name: str, path: str) -> None:
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        remote = repo.cloud.get_remote(remote_name)
        if remote.fs.exists(path):
            remote.fs.rm_file(path)


# --- download and listing -----------------------------------------------------------------------

def download(version: str, exit_layer: int, ratio: int = 1, repo: str | Path = ".", out: str | Path = "downloads",
             remote_name: str | None = None, remote_url: str | None = None) -> Path:
    """Fetches one exit model of release ``version`` into ``out/<folder>``, verified against its manifest.

    The folder appears only after every sha256 matched; a tampered download leaves ``out`` untouched.
    """
    repo = str(repo)
    available = release_versions(list_tags(repo))
    if version not in available:
        raise ReleaseError(f"{repo} has no release {version}; releases: {', '.join(available) or 'none'}")
    name = artifact_name(exit_layer, ratio)
    fs = open_at(repo, version, remote_name=remote_name, remote_url=remote_url)
    try:
        declared = (yaml.safe_load(fs.read_text("dvc.yaml")) or {}).get("artifacts") or {}
        if name not in declared:
            have = sorted(n for n in declared if ARTIFACT_RE.match(n))
            raise ReleaseError(f"release {version} has no exit model {name}; it has: {', '.join(have) or 'none'}")
        path = declared[name]["path"]
        dest = Path(out) / PurePosixPath(path).name
        with atomic_dir(dest) as tmp:
            try:
                fs.get(path, str(tmp / "payload"), recursive=True)
            except Exception as err:  # DVC's errors here are often misleading (PathMissingError, ...)
                raise ReleaseError(
                    f"could not fetch {path} of release {version} from its DVC remote ({type(err).__name__}: "
                    f"{err}); if the tag predates the remote, pass its URL (--remote-url)") from err
            for item in (tmp / "payload").iterdir():
                item.rename(tmp / item.name)
            (tmp / "payload").rmdir()
            verify_manifest(tmp)
    finally:
        fs.close()
    logger.info("downloaded %s of %s into %s (sha256 verified)", name, version, dest)
    return dest


def list_releases(repo: str | Path = ".", remote_name: str | None = None,
                  remote_url: str | None = None) -> list[dict]:
    """Every release version (oldest first) with the per-layer metrics committed at its tag."""
    releases = []
    for version in release_versions(list_tags(str(repo))):
        fs = open_at(str(repo), version, remote_name=remote_name, remote_url=remote_url)
        try:
            raw = yaml.safe_load(fs.read_text("params.yaml")) if fs.exists("params.yaml") else {}
            metrics_path = ((raw or {}).get("paths") or {}).get("metrics", "metrics/per_layer.json")
            try:
                metrics = json.loads(fs.read_text(metrics_path))
            except (FileNotFoundError, json.JSONDecodeError) as err:
                logger.warning("release %s: cannot read %s (%s)", version, metrics_path, err)
                metrics = {}
            measures = ((raw or {}).get("evaluation") or {}).get("measures")
        finally:
            fs.close()
        releases.append({"version": version, "metrics_path": metrics_path, "measures": measures,
                         "configs": metrics.get("configs") or {}})
    return releases


def releases_markdown(releases: list[dict]) -> str:
    if not releases:
        return "No releases yet.\n"
    lines = []
    for release in reversed(releases):
        configs = release["configs"]
        measures = release["measures"] or sorted({m for c in configs.values() for m, v in c.items()
                                                  if isinstance(v, float) and m not in ("latency_ms_per_query",)})
        lines += [f"## {release['version']}", "", "| config | " + " | ".join(measures) + " |",
                  "|---|" + "---|" * len(measures)]
        for name, entry in configs.items():
            values = [f"{entry[m]:.4f}" if isinstance(entry.get(m), (int, float)) else "-" for m in measures]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)

