"""Publish gated releases of the exported exit models, and download them back by version.

A release is one git commit holding the reproduced pipeline state (``dvc.lock``, params, metrics),
tagged ``vX.Y.Z`` (see ``versions``) plus one DVC model-registry tag per exit model
(``exit-08-ratio-1@vX.Y.Z``, so ``dvc artifacts get`` works), with the ONNX folders in the DVC
remote named by ``release.remote_name``. ``publish`` refuses unless:

- ``dvc status`` is clean (every stage reproduced) and the only uncommitted changes are what
  ``dvc repro`` wrote: ``dvc.lock``, the params files it records, git-tracked (``cache: false``)
  outputs and ``.gitignore`` files, plus the gate report. ``publish`` commits exactly those
  ("Release vX"); any other change (code, dvc.yaml, .dvc/config) must be committed first.
- ``dvc.yaml``'s ``artifacts:`` match ``export.exit_layers x export.ratios`` and ``specialist.exits``
  (``matryoshka artifacts``).
- every exported folder matches its ``manifest.json`` sha256s, and the gate passes against the last
  release recorded in the release remote (``gate``); ``gate.*`` / ``evaluation.*`` are the committed
  ones (no overrides, no uncommitted edits: the release under test does not set its own policy).
- the version is new: no local tag, no git-remote tag, no record in the release remote (``releases/``).

The version is claimed first, atomically, by creating its record in the release remote
(``records``), so of two concurrent publishes exactly one proceeds; the record and
``releases/<version>.json`` in the release commit hold the sha256 of every released file, which
``download`` checks. A lock file serialises publishes in one checkout, and a journal in ``.git``
lets a publish interrupted by Ctrl-C, SIGTERM or a Prefect cancellation be completed by rerunning it.

The remote is added to ``.dvc/config`` (local paths made absolute) and committed *before* tagging:
a tag whose commit lacks the remote config cannot be fetched later. Data is pushed, then checked
object by object in the remote for the tagged commit, because ``dvc push -A/-T`` silently skip
revisions whose config lacks the remote; earlier release tags are back-filled the same way.
If HEAD is already a release and nothing changed, publishing is a no-op ("unchanged").
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from ..config import Params
from ..core.atomic import atomic_dir, atomic_file, sha256_file, write_json, write_text
from ..core.errors import MatryoshkaError
from ..pipeline.model_card import release_card
from ..serving.artifacts import (
    MANIFEST,
    NAME_RE,
    SPECIALIST,
    ModelIntegrityError,
    config_name,
    folder_files,
    parse_config_name,
    ratio_folder,
    read_manifest,
    verify_files,
)
from .gate import GateError, GateFailed, GateReport, run_gate
from .revisions import (
    absolute_remote_url,
    dirty_paths,
    git,
    list_tags,
    open_at,
    redact,
    repo_root,
    rev_commit,
)
from .versions import check_new_version, next_version, parse_version, release_versions

logger = logging.getLogger(__name__)

from .records import RECORDS_DIR, UNRELEASED, RecordError  # noqa: E402  (releases/<version>.json: in the remote and in git)

ARTIFACT_RE = NAME_RE


class ReleaseError(MatryoshkaError):
    """Publishing or downloading was refused or failed; nothing was published or overwritten."""


class ManifestError(ReleaseError):
    """A model folder does not match its manifest (tampered, truncated or incomplete)."""


# --- exit models as DVC artifacts ---------------------------------------------------------------

def artifact_name(exit_layer: int, ratio: int, variant: str | None = None) -> str:
    """DVC artifact name of one exit model: its config name ``exit-08-ratio-1`` (GTO allows no ``_@#``),
    ``exit-08-ratio-1-specialist`` for an exit specialist."""
    return config_name(exit_layer, ratio, variant)


def expected_artifacts(params: Params) -> dict[str, dict]:
    """The ``artifacts:`` entries that ``export.exit_layers x export.ratios`` call for: each exit's path
    is its ratio's folder (the exits of a ratio share one weights file there); an exit specialist
    (``specialist.exits``) is its own folder."""
    onnx = PurePosixPath(params.paths.onnx)
    specialists = {
        artifact_name(k, 1, SPECIALIST): {
            "path": str(onnx / config_name(k, 1, SPECIALIST)),
            "type": "model",
            "desc": f"Matryoshka re-ranker, ONNX, exit specialist at layer {k} (its own weights), ratio 1",
            "labels": ["onnx", "reranker", f"exit-{k}", "ratio-1", SPECIALIST],
            "meta": {"exit_layer": k, "compress_ratio": 1, "variant": SPECIALIST},
        }
        for k in params.specialist.exits
    }
    return {
        artifact_name(k, r): {
            "path": str(onnx / ratio_folder(r)),
            "type": "model",
            "desc": f"Matryoshka re-ranker, ONNX, exit layer {k}, token compression ratio {r}",
            "labels": ["onnx", "reranker", f"exit-{k}", f"ratio-{r}"],
            "meta": {"exit_layer": k, "compress_ratio": r},
        }
        for k in params.export.exit_layers for r in params.export.ratios
    } | specialists


def check_artifacts_in_sync(params: Params, root: str | Path = ".") -> None:
    """Raises ``ReleaseError`` naming every difference between dvc.yaml's exit-model artifacts and params."""
    problems = artifacts_out_of_sync(params, root)
    if problems:
        raise ReleaseError("dvc.yaml artifacts do not match params.yaml (run `matryoshka artifacts`): "
                           + "; ".join(problems))


def artifacts_out_of_sync(params: Params, root: str | Path = ".") -> list[str]:
    """Differences between dvc.yaml's exit-model artifacts and params (empty when in sync)."""
    declared = (_load_dvc_yaml(Path(root) / "dvc.yaml").get("artifacts") or {})
    ours = {n: a for n, a in declared.items() if ARTIFACT_RE.match(n)}
    expected = expected_artifacts(params)
    problems = [f"missing artifact {n}" for n in expected if n not in ours]
    problems += [f"artifact {n} is not in export.exit_layers x export.ratios (or specialist.exits)"
                 for n in ours if n not in expected]
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
    status: str  # published | unchanged | dry_run | abandoned
    version: str | None
    commit: str | None
    remote_url: str
    tags: list[str] = field(default_factory=list)
    pushed: int = 0
    gate: GateReport | None = None

    def to_dict(self) -> dict:
        """What ``matryoshka publish`` prints and the release flow returns."""
        return {"status": self.status, "version": self.version, "commit": self.commit, "remote": self.remote_url,
                "tags": self.tags, "pushed": self.pushed}


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReleaseError(f"dvc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


POLICY_SECTIONS = ("gate", "evaluation")  # what the release under test may not set for itself
# ...nor where the baseline it is gated against lives: a release remote (or tag remote) pointed elsewhere by an
# uncommitted edit or `-S release.remote_url=...` holds no earlier release, so the gate would see a first release.
# (`release.remote_name` is only the DVC remote's local name and may be overridden.)
POLICY_FIELDS = {"release": ("remote_url", "git_remote")}


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


def check_policy(params: Params, root: Path, params_file: str = "params.yaml", overrides: Sequence[str] = ()) -> None:
    """The release under test must not set its own gate: ``gate.*``, ``evaluation.*``, ``release.remote_url`` and
    ``release.git_remote`` (where the baseline lives) are the committed ones.

    Refuses overrides (``-S gate.*`` ...) and uncommitted edits of those settings (other params edits that
    ``dvc repro`` reproduced are committed with the release as before).
    """
    from ..config import parse_params

    def is_policy(key: str) -> bool:
        section, _, field = key.partition(".")
        return section in POLICY_SECTIONS or field.split(".")[0] in POLICY_FIELDS.get(section, ())

    bad = [o for o in overrides if is_policy(o.split("=", 1)[0].strip().lstrip("+"))]
    if bad:
        raise ReleaseError(f"publish refuses overrides of the release policy ({', '.join(bad)}): the gate and its "
                           "measures are what the committed params.yaml says; change them in a reviewed commit")
    path = Path(params_file)
    if path.is_absolute():  # `git show HEAD:<path>` takes paths relative to the repository root only
        path = Path(os.path.relpath(path.resolve(), root.resolve()))
    committed_text = git(root, "show", f"HEAD:{path.as_posix()}", check=False)
    committed = parse_params(yaml.safe_load(committed_text) or {}) if committed_text else parse_params({})
    differing = [s for s in POLICY_SECTIONS if getattr(committed, s) != getattr(params, s)]
    differing += [f"{s}.{f}" for s, fields in POLICY_FIELDS.items() for f in fields
                  if getattr(getattr(committed, s), f) != getattr(getattr(params, s), f)]
    if differing:
        raise ReleaseError(f"params `{differing[0]}` differs from the committed {params_file}: the release under "
                           "test may not set its own policy; commit the change first (it is then reviewed "
                           "and applies to later releases)")


def ensure_remote(root: Path, name: str, url: str) -> str:
    """Adds (or re-points) the release remote in ``.dvc/config`` (repo level, committed). Returns its URL.

    It is never made DVC's *default* remote: ``dvc gc -c`` and plain ``dvc push`` act on the default
    remote, and neither may touch released versions (docs/release.md, "How releases are protected").
    """
    from dvc.repo import Repo

    url = absolute_remote_url(url, root)
    with Repo(str(root)) as repo:
        config = repo.config.read("repo")
    current = (config.get("remote") or {}).get(name)
    if current is None:
        _dvc(root, "remote", "add", "--", name, url)
        logger.info("added DVC remote %r -> %s", name, redact(url))
    elif absolute_remote_url(current.get("url", ""), root / ".dvc") != url:
        logger.warning("DVC remote %r pointed to %s; setting it to %s (params.yaml)", name,
                       redact(current.get("url", "")), redact(url))
        _dvc(root, "remote", "modify", "--", name, "url", url)
    if (config.get("core") or {}).get("remote") == name:
        _dvc(root, "remote", "default", "--unset")
        logger.warning("DVC remote %r was the default remote; unset it so `dvc gc -c` cannot reach releases", name)
    return url


REMOTE_PLUGINS = {"s3": "dvc-s3", "gs": "dvc-gs", "gcs": "dvc-gs", "azure": "dvc-azure", "az": "dvc-azure",
                  "ssh": "dvc-ssh", "hdfs": "dvc-hdfs", "webdav": "dvc-webdav", "webdavs": "dvc-webdav",
                  "oss": "dvc-oss", "http": "dvc-http", "https": "dvc-http", "gdrive": "dvc-gdrive"}


def check_remote_plugin(url: str) -> None:
    """A remote whose DVC plugin is not installed fails before anything is committed, with the fix."""
    import importlib.util

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if not scheme or scheme == "file":
        return
    plugin = REMOTE_PLUGINS.get(scheme)
    if plugin is None:
        raise ReleaseError(f"release.remote_url {redact(url)}: unsupported scheme {scheme!r}")
    if importlib.util.find_spec(plugin.replace("-", "_")) is None:
        raise ReleaseError(f"release.remote_url {redact(url)} needs the DVC plugin {plugin}: "
                           f"pip install {plugin}  (nothing was committed or published)")


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
    (one folder output, or one output per ratio folder), plus the metrics if DVC caches them."""
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
    """{artifact: folder} for every configured exit model; each folder checked once against its
    manifest, which must list the exit."""
    folders, manifests = {}, {}
    for name, artifact in expected_artifacts(params).items():
        folder = root / artifact["path"]
        if not folder.is_dir():
            raise ReleaseError(f"{folder}: exported model folder missing (export.exit_layers x export.ratios, "
                               "specialist.exits)")
        if folder not in manifests:
            manifests[folder] = verify_manifest(folder)
        if name not in {m.get("name") for m in manifests[folder]["models"]}:
            raise ReleaseError(f"{folder}: its manifest lists no {name} (export.exit_layers x export.ratios, "
                               "specialist.exits)")
        folders[name] = folder
    return folders


class PublishInterrupted(ReleaseError):
    """SIGTERM/SIGINT during publish: the journal is kept and a rerun completes the release."""


@contextlib.contextmanager
def _publish_lock(root: Path):
    """One publish at a time per checkout (``O_EXCL`` lock file in .git); a dead holder's lock is taken over."""
    path = _git_path(root, "matryoshka-publish.lock")
    fd = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = path.read_text().strip() if path.exists() else ""
            if holder.isdigit() and not _alive(int(holder)):
                logger.warning("removing the publish lock of dead process %s", holder)
                path.unlink(missing_ok=True)
                continue
            raise ReleaseError(f"another `matryoshka publish` (pid {holder or '?'}) is running in {root}; "
                               "exactly one of concurrent publishes proceeds, wait for it") from None
    if fd is None:
        raise ReleaseError(f"cannot take the publish lock {path}")
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _git_path(root: Path, name: str) -> Path:
    path = Path(git(root, "rev-parse", "--git-path", name))
    return path if path.is_absolute() else root / path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _interruptible():
    """SIGTERM (Prefect cancellation, `kill`) raises ``PublishInterrupted`` as Ctrl-C does, so cleanup
    runs and the journal stays; a rerun resumes from it."""
    import signal

    def handler(signum, frame):
        raise PublishInterrupted(f"publish interrupted by signal {signum}; run it again to complete the release")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave the handlers alone
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Journal:
    """``.git/matryoshka-publish.json``: the release in progress (version, claim nonce, commit)."""

    def __init__(self, root: Path):
        self.path = _git_path(root, "matryoshka-publish.json")
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self, **changes) -> None:
        self.data.update(changes)
        with atomic_file(self.path, encoding="utf-8") as handle:
            json.dump(self.data, handle, indent=2)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.data = {}


def file_hashes(folders: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{artifact: {relative path: sha256}} of every released file, manifests included (a ratio's
    folder is hashed once, however many of its exits are artifacts)."""
    hashed: dict[Path, dict[str, str]] = {}
    for folder in dict.fromkeys(folders.values()):
        files = folder_files(folder)
        files[MANIFEST] = sha256_file(folder / MANIFEST)
        hashed[folder] = dict(sorted(files.items()))
    return {name: hashed[folder] for name, folder in folders.items()}


def release_record(params: Params, root: Path, version: str, report: GateReport, folders: dict[str, Path],
                   waived: bool) -> dict:
    """What is committed as ``releases/<version>.json`` and stored (plus the commit) in the remote record."""
    from .gate import current_results

    results = current_results(params, root)
    return {
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "artifacts": {n: {"path": a["path"]} for n, a in expected_artifacts(params).items()},
        "files": file_hashes(folders),
        "remote_name": params.release.remote_name,  # where downloads find the data (release_remote)
        "policy": {"gate": params.gate.model_dump(), "measures": list(params.evaluation.measures)},
        "gate": {"passed": report.passed, "waived": waived, "baseline": report.baseline_version,
                 "regressions": report.regressions},
        "eval": results["metrics"].get("eval", {}),
        "metrics": results["metrics"],
        "per_query": results["per_query"],
    }


def publish(params: Params, repo: str | Path = ".", version: str | None = None, dry_run: bool = False,
            skip_gate: bool = False, overrides: Sequence[str] = (), params_file: str = "params.yaml") -> PublishResult:
    """Gate, commit the reproduced state, push the exit models, tag. See the module docstring.

    One publish per checkout at a time (a lock file) and per version across clones (an atomic claim
    of the version's record in the release remote). An interrupted publish (Ctrl-C, SIGTERM,
    Prefect cancellation) leaves a journal; the next run completes that release.
    """
    root = repo_root(repo)
    check_remote_plugin(params.release.remote_url)
    check_policy(params, root, params_file, overrides)
    with _publish_lock(root), _interruptible():
        journal = Journal(root)
        if journal.data:
            if dry_run:  # completing it pushes, tags and records: not a dry run's business
                logger.info("dry run: would complete the interrupted publish of %s", journal.data["version"])
                return PublishResult("dry_run", journal.data["version"], journal.data.get("commit"),
                                     redact(absolute_remote_url(params.release.remote_url, root)))
            return _resume(params, root, journal)
        return _publish(params, root, version, dry_run, skip_gate, journal)


def _publish(params: Params, root: Path, version: str | None, dry_run: bool, skip_gate: bool,
             journal: Journal) -> PublishResult:
    from .records import RecordStore

    remote_url = absolute_remote_url(params.release.remote_url, root)
    check_artifacts_in_sync(params, root)
    changes = pipeline_changes(root, params)
    head = rev_commit(root, "HEAD")
    head_releases = [t for t in release_versions(list_tags(root)) if rev_commit(root, t) == head]
    if head_releases and not [p for p in changes if not _under(p, {params.paths.gate_report})]:
        if version is not None and version not in head_releases:
            raise ReleaseError(f"HEAD is already release {head_releases[-1]} and nothing changed; "
                               f"not releasing it again as {version}")
        logger.info("HEAD is already release %s and nothing changed: nothing to publish", head_releases[-1])
        return PublishResult("unchanged", head_releases[-1], head, redact(remote_url))
    folders = verify_exports(root, params)
    targets = _release_targets(root, params)
    store = RecordStore.from_params(params, root)
    existing = set(store.taken_versions())
    version = check_new_version(version or next_version(existing, params.release.version_scheme), existing)
    if params.release.git_remote:
        _check_not_behind(root, params.release.git_remote)

    try:
        report = run_gate(params, root)
    except (GateError, RecordError) as err:
        if not skip_gate:
            raise
        # e.g. the last release predates release records: an explicit, recorded waiver is the only way past
        logger.warning("gate could not compare (%s); --skip-gate waives it: recorded in the release", err)
        report = GateReport(passed=False, baseline_version=None, baseline_commit=None,
                            measures=list(params.evaluation.measures),
                            tolerance={"max_drop_abs": params.gate.max_drop_abs, "max_drop_rel": params.gate.max_drop_rel,
                                       "alpha": params.gate.alpha, "confidence": params.evaluation.confidence},
                            eval={"error": str(err)})
    waived = not report.passed and skip_gate
    if not skip_gate:
        report.raise_if_failed(params.paths.gate_report)
    if waived:
        logger.warning("gate failed (%s) but --skip-gate waives it: recorded in the release", report.regressions)
    if dry_run:
        logger.info("dry run: would publish %s with %d changed files", version, len(changes))
        return PublishResult("dry_run", version, head, redact(remote_url), gate=report)

    # 1. Claim the version in the remote first: a concurrent publish of the same version loses here,
    #    before it has committed or tagged anything. The claim's nonce is journalled before the claim
    #    exists, so an interruption at any point after it is rolled back (here or by the next run).
    record = release_record(params, root, version, report, folders, waived)
    nonce = secrets.token_hex(16)
    record_file = Path(RECORDS_DIR) / f"{version}.json"
    card_file = record_file.with_suffix(".md")
    written = {p: base64.b64encode((root / p).read_bytes()).decode() if (root / p).exists() else None
               for p in (".dvc/config", record_file.as_posix(), card_file.as_posix())}  # restored if no commit is made
    journal.save(version=version, nonce=nonce, base=head, written=written)  # a SIGKILLed run's successor restores them
    try:
        store.claim(version, {**record, "status": "claimed"}, nonce)
        # 2. The reproduced state, the release record (file hashes) and the remote config: one commit.
        ensure_remote(root, params.release.remote_name, params.release.remote_url)
        write_json(root / record_file, record)
        write_text(root / card_file, release_card(version, record))
        to_add = sorted(set(changes) | {".dvc/config", params.paths.gate_report, record_file.as_posix(),
                                        card_file.as_posix()})
        git(root, "add", "-A", "--", *[p for p in to_add if (root / p).exists() or p in changes])
        git(root, "commit", "-q", "-m", f"Release {version}", "-m", _commit_body(params, report, waived))
        journal.save(commit=rev_commit(root, "HEAD"))
    except BaseException:
        if "commit" not in journal.data:
            made = _unjournalled_commit(root, journal)
            if made:  # a signal right after `git commit`: the next run completes this release
                journal.save(commit=made)
            else:  # nothing was committed: give the version back, leave the tree as it was
                _give_back(root, store, journal)
        raise
    return _resume(params, root, journal, targets=targets, report=report)


def _check_not_behind(root: Path, git_remote: str) -> None:
    """The release commit goes on HEAD's branch and is pushed to ``git_remote`` (step 4): where that branch
    has commits HEAD lacks, the push would be refused after the version was claimed and tagged, so refuse now."""
    branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":  # detached: only the tags are pushed
        return
    line = git(root, "ls-remote", "--heads", "--", git_remote, f"refs/heads/{branch}")
    tip = line.split()[0] if line else None
    if tip and git(root, "merge-base", "--", tip, "HEAD", check=False) != tip:
        raise ReleaseError(f"{git_remote}/{branch} has commits this checkout lacks (a release published from another "
                           f"checkout?): the release commit could not be pushed there. `git pull {git_remote} "
                           f"{branch}`, `dvc repro`, then publish again (nothing was claimed, committed or tagged)")


def _resume(params: Params, root: Path, journal: Journal, targets: list[str] | None = None,
            report: GateReport | None = None) -> PublishResult:
    """Completes the release the journal describes: data, tags, git push, the remote record. Idempotent."""
    from .records import RecordStore

    store = RecordStore.from_params(params, root)
    version, nonce, commit = journal.data["version"], journal.data["nonce"], journal.data.get("commit")
    remote_url = absolute_remote_url(params.release.remote_url, root)
    if commit is None:
        commit = _unjournalled_commit(root, journal)  # killed right after `git commit`
        if commit:
            journal.save(commit=commit)
    if commit is None:  # stopped (killed) before the release commit: give the version back, start afresh
        _give_back(root, store, journal)
        raise ReleaseError(f"the previous publish of {version} stopped before committing; its claim was "
                           "removed: run publish again")
    if rev_commit(root, "HEAD") != commit:
        raise ReleaseError(f"an interrupted publish of {version} (commit {commit[:12]}) is pending but HEAD moved; "
                           f"check out {commit[:12]} and run publish again to complete it, or give it up with "
                           "`matryoshka publish --abandon`")
    logger.info("completing release %s (commit %s)", version, commit[:12])
    targets = targets or _release_targets(root, params)
    record = json.loads((root / RECORDS_DIR / f"{version}.json").read_text())
    older = [t for t in store.known_versions() if parse_version(t) < parse_version(version) and _released(store, t)]
    pushed = push_release_data(root, targets, params.release.remote_name, "HEAD", backfill=older)
    tags = [version] + [f"{name}@{version}" for name in expected_artifacts(params)]
    gate = record["gate"]
    message = f"Release {version}" + (f" (gate WAIVED: regressed {', '.join(gate['regressions'])})"
                                      if gate.get("waived") else "")
    for tag in tags:
        existing = rev_commit(root, tag)
        if existing is None:
            git(root, "tag", "-a", "-m", message, "--", tag, commit)
        elif existing != commit:
            raise ReleaseError(f"tag {tag} exists and points at {existing[:12]}, not the release commit {commit[:12]}")
    push_release_data(root, targets, params.release.remote_name, version)  # resolvable *at the tag*
    if params.release.git_remote:
        branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
        refs = ([f"HEAD:refs/heads/{branch}"] if branch != "HEAD" else []) + [f"refs/tags/{t}" for t in tags]
        git(root, "push", "--atomic", "--", params.release.git_remote, *refs)
    store.update(version, nonce, {**record, "commit": commit, "status": "published"})
    journal.clear()
    logger.info("published %s (commit %s) to %s: %d objects pushed", version, commit[:12], redact(remote_url), pushed)
    return PublishResult("published", version, commit, redact(remote_url), tags=tags, pushed=pushed, gate=report)


def abandon(params: Params, repo: str | Path = ".") -> PublishResult:
    """Gives up the interrupted publish this checkout's journal names, instead of completing it (``publish``
    again completes it; this is for a release no longer wanted, or one whose commit HEAD has moved past).

    Refused once any of it is public (its tags at ``release.git_remote``, or its record completed): a
    published version stays. Otherwise the version's record in the release remote is marked ``abandoned``
    (kept, so the number is never given to other files: ``taken_versions``; the gate, ``latest`` and
    ``download`` skip or refuse it), the release's local tags are deleted and the journal is cleared. The
    release commit, if one was made, stays in the history as a plain commit; data already pushed to the DVC
    remote is content-addressed and harmless. A publish stopped before its commit is rolled back as the next
    ``publish`` would (claim removed, files restored).
    """
    from .records import RecordStore

    root = repo_root(repo)
    with _publish_lock(root), _interruptible():
        journal = Journal(root)
        if not journal.data:
            raise ReleaseError("no interrupted publish in this checkout: nothing to abandon")
        store = RecordStore.from_params(params, root)
        version, nonce = journal.data["version"], journal.data["nonce"]
        remote_url = redact(absolute_remote_url(params.release.remote_url, root))
        commit = journal.data.get("commit") or _unjournalled_commit(root, journal)
        if commit is None:
            _give_back(root, store, journal)
            logger.info("abandoned the publish of %s (stopped before its commit): claim removed", version)
            return PublishResult("abandoned", version, None, remote_url)
        if store.git_remote_url and version in list_tags(store.git_remote_url):
            raise ReleaseError(f"{version} is already pushed to {params.release.git_remote}: it is public and cannot "
                               f"be abandoned; check out {commit[:12]} and run publish again to complete it")
        try:
            record = store.read(version)
        except RecordError:
            if store.fs.exists(store.path(version)):  # there but unreadable (network, permissions): keep the journal
                raise
            record = {}
        if record.get("claim") == nonce and record.get("status") == "published":
            journal.clear()  # the release finished; only clearing its journal was left
            logger.info("%s was published (its record is complete): nothing to abandon; journal cleared", version)
            return PublishResult("published", version, commit, remote_url)
        if record.get("claim") == nonce:
            store.update(version, nonce, {"status": "abandoned", "commit": commit,
                                          "abandoned": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        else:
            logger.warning("release %s: the remote record is not this publish's claim; left as it is", version)
        ours = [t for t in list_tags(root) if (t == version or t.endswith(f"@{version}")) and rev_commit(root, t) == commit]
        for tag in ours:
            git(root, "tag", "-d", "--", tag)
        journal.clear()
        logger.info("abandoned the publish of %s: record marked abandoned, %d local tags deleted, commit %s kept",
                    version, len(ours), commit[:12])
        return PublishResult("abandoned", version, commit, remote_url, tags=ours)


def _released(store, version: str) -> bool:
    """False for a version whose record is a claim or an abandoned publish (no data to back-fill at its tag)."""
    try:
        return store.read(version).get("status") not in UNRELEASED
    except RecordError:
        return True  # a tag without a readable record: back-filling reports it, as before


def _unjournalled_commit(root: Path, journal: Journal) -> str | None:
    """The release commit of the journalled publish when it was made but not yet journalled (a signal or
    SIGKILL between `git commit` and the journal): HEAD is ``Release <version>`` right on the journalled base."""
    base, head = journal.data.get("base"), rev_commit(root, "HEAD")
    if not base or head is None or head == base or rev_commit(root, "HEAD^") != base:
        return None
    return head if git(root, "log", "-1", "--format=%s", "HEAD") == f"Release {journal.data['version']}" else None


def _give_back(root: Path, store, journal: Journal) -> None:
    """Rolls back a publish that made no commit: its claim (if still ours), the index, and the remote config,
    record and card it wrote (else the next publish refuses them as foreign changes)."""
    store.release(journal.data["version"], journal.data["nonce"])
    git(root, "reset", "-q", check=False)
    for path, before in (journal.data.get("written") or {}).items():
        if before is None:
            (root / path).unlink(missing_ok=True)
        else:
            with atomic_file(root / path, "wb") as out:
                out.write(base64.b64decode(before))
    journal.clear()


def _commit_body(params: Params, report: GateReport, waived: bool) -> str:
    baseline = report.baseline_version or "none (first release)"
    if waived:
        gate = "WAIVED (failed: " + ", ".join(report.regressions) + ")"
    else:
        gate = "passed" if report.passed else "FAILED"
    return (f"Gate: {gate} against {baseline}; exits {params.export.exit_layers} x ratios {params.export.ratios}. "
            f"Released files and their sha256: {RECORDS_DIR}/<version>.json.")


# --- download and listing -----------------------------------------------------------------------

def download(version: str, exit_layer: int, ratio: int = 1, repo: str | Path = ".", out: str | Path = "downloads",
             remote_name: str | None = None, remote_url: str | None = None, variant: str | None = None) -> Path:
    """Fetches one exit model of release ``version`` into ``out/<version>/ratio-<r>``, verified: the
    folder of its ratio (every exit of the ratio beside one weights file; open it with
    ``OnnxReranker(folder, exit_layer)``). ``variant="specialist"``: the exit specialist, in
    ``out/<version>/exit-KK-ratio-1-specialist``.

    Every file is checked against the sha256 recorded in ``releases/<version>.json`` *in git at the
    release tag* (whoever can write the DVC remote cannot rewrite it), the folder must hold exactly
    the recorded files, and the tag must still point at the commit the release record names. The
    folder appears only after all of that passed; a second version lands beside the first.
    """
    repo = str(repo)
    version = resolve_version(version, repo)  # `latest`: the newest finished release, as `serve --version` takes it
    name = artifact_name(exit_layer, ratio, variant)
    fs = open_at(repo, version, remote_name=remote_name, remote_url=remote_url)
    try:
        declared = (yaml.safe_load(fs.read_text("dvc.yaml")) or {}).get("artifacts") or {}
        if name not in declared:
            have = sorted(n for n in declared if ARTIFACT_RE.match(n))
            raise ReleaseError(f"release {version} has no exit model {name}; it has: {', '.join(have) or 'none'}")
        try:
            record = json.loads(fs.read_text(f"{RECORDS_DIR}/{version}.json"))  # git content at the tag
        except FileNotFoundError:
            raise ReleaseError(f"release {version} has no {RECORDS_DIR}/{version}.json in git: it predates "
                               "verifiable releases, or the tag was moved") from None
        expected = (record.get("files") or {}).get(name)
        if not expected:
            raise ReleaseError(f"release {version}: its record lists no files for {name}")
        _check_tag_commit(repo, version, remote_url or _remote_url_of(fs, remote_name, version))
        path = declared[name]["path"]
        dest = Path(out) / version / PurePosixPath(path).name
        if _cached_and_intact(dest, expected, quiet=True):  # another exit of the same ratio folder, already here
            logger.info("%s of %s is in %s already (every file verified)", name, version, dest)
            return dest
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
            try:
                verify_files(tmp, expected)
            except ModelIntegrityError as err:
                raise ManifestError(f"release {version}, {name}: {err} (checked against {RECORDS_DIR}/{version}.json "
                                    "at the release tag)") from None
            verify_manifest(tmp)
    finally:
        fs.close()
    logger.info("downloaded %s of %s into %s (sha256 verified against the release record in git)", name, version, dest)
    return dest


def resolve_version(version: str, repo: str | Path = ".") -> str:
    """``latest`` -> the newest release tag of ``repo`` whose publish finished; a named version must exist."""
    available = release_versions(list_tags(str(repo)))
    if version == "latest":
        if not available:
            raise ReleaseError(f"{repo} has no releases yet")
        for candidate in reversed(available):
            if not _unfinished(repo, candidate):
                return candidate
            logger.warning("release %s is tagged but its publish has not finished (or was abandoned): latest skips it", candidate)
        raise ReleaseError(f"{repo} has no finished release; tagged: {', '.join(available)}")
    if version not in available:
        raise ReleaseError(f"{repo} has no release {version}; releases: {', '.join(available) or 'none'}")
    return version


def release_cache(repo: str | Path) -> Path:
    """Per-repository download cache: ``$MATRYOSHKA_CACHE/releases/<repo key>/<version>/ratio-<r>``."""
    import hashlib

    from ..core.assets import cache_dir

    key = str(repo) if "://" in str(repo) or "@" in str(repo) else str(Path(repo).resolve())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key.rstrip("/").rsplit("/", 1)[-1])[:40]
    return cache_dir() / "releases" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def fetch_release(version: str = "latest", repo: str | Path = ".", exit_layers: Sequence[int] | None = None,
                  ratios: Sequence[int] | None = None, cache: Path | None = None,
                  variant: str | None = None, shared: bool = True) -> tuple[str, list[Path]]:
    """Exit models of a release in the local cache (downloaded and verified once, reused while they verify):
    the shared-weight ones, and with ``variant="specialist"`` the release's exit specialists too
    (``shared=False``: those alone, e.g. to open one specialist)."""
    version = resolve_version(version, repo)
    cache = cache or release_cache(repo)
    fs = open_at(str(repo), version)
    try:
        record = json.loads(fs.read_text(f"{RECORDS_DIR}/{version}.json"))
    except FileNotFoundError:
        raise ReleaseError(f"release {version} has no {RECORDS_DIR}/{version}.json in git") from None
    finally:
        fs.close()
    wanted = []
    for name in record.get("files", {}):
        k, r, kind = parse_config_name(name)
        if kind in ((None, variant) if shared else (variant,)) and (exit_layers is None or k in exit_layers) and (ratios is None or r in ratios):
            wanted.append((k, r, kind, name))
    if not wanted:
        raise ReleaseError(f"release {version} has no exit model for exit_layers={exit_layers}, ratios={ratios}; "
                           f"it has {sorted(record.get('files', {}))}")
    folders = []
    for k, r, kind, name in wanted:
        folder = cache / version / record["artifacts"][name]["path"].rsplit("/", 1)[-1]
        if folder in folders:  # another exit of the same ratio folder, already fetched
            continue
        if not _cached_and_intact(folder, record["files"][name]):
            folder = download(version, k, r, repo=repo, out=cache, variant=kind)
        folders.append(folder)
    return version, folders


def _unfinished(repo: str | Path, version: str) -> bool:
    """True when the release remote's record of ``version`` is still a publish's claim (tags pushed, record not
    completed) or an abandoned publish; where that cannot be read, ``download`` decides."""
    from .records import RecordError, RecordStore

    fs = open_at(str(repo), version)
    try:
        url = _remote_url_of(fs, None, version)
    finally:
        fs.close()
    try:
        return bool(url) and RecordStore(url).read(version).get("status") in UNRELEASED
    except RecordError:
        return False


def _cached_and_intact(folder: Path, expected: dict[str, str], quiet: bool = False) -> bool:
    if not folder.is_dir():
        return False
    try:
        verify_files(folder, expected)
    except ModelIntegrityError as err:
        if not quiet:
            logger.warning("cached %s no longer verifies (%s); downloading again", folder, err)
        return False
    return True


def _remote_url_of(fs, remote_name: str | None, version: str) -> str | None:
    """The release remote's URL as configured in the (already open) repository at the tag."""
    from .revisions import release_remote

    return (fs.repo.config["remote"].get(release_remote(fs, remote_name, version)) or {}).get("url")


def _check_tag_commit(repo: str, version: str, url: str | None) -> None:
    """The tag must point at the commit the release remote's record names (a moved tag is refused)."""
    from .records import RecordError, RecordStore

    if not url:
        raise ReleaseError(f"release {version}: no release remote to check its record against (pass --remote-url)")
    try:
        record = RecordStore(url).read(version)
    except RecordError as err:
        raise ReleaseError(str(err)) from None
    if record.get("status") == "abandoned":
        raise ReleaseError(f"release {version} was abandoned before it was published (`matryoshka publish --abandon`)")
    if record.get("status") == "claimed":
        raise ReleaseError(f"release {version} is not finished: its publish stopped before completing its record "
                           "in the release remote (the publisher's next `matryoshka publish` completes it)")
    tagged = [line.split()[0] for line in git(".", "ls-remote", "--", repo, f"refs/tags/{version}^{{}}",
                                              f"refs/tags/{version}").splitlines()]
    commit = tagged[0] if tagged else None
    if record.get("commit") is None or commit is None or record["commit"] not in tagged:
        raise ReleaseError(f"release {version}: tag points at {(commit or '?')[:12]} but the release record names "
                           f"{str(record.get('commit'))[:12]}; the tag was moved or the record altered: refused")


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

