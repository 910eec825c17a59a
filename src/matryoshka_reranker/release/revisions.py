"""The project at a git revision: git plumbing, and DVC reads that reach the release remote.

Releases are git tags; their data lives in a DVC remote named in the tag's own ``.dvc/config``.
A tag made before that remote was configured cannot be fetched as is (DVC raises a misleading
``FileNotFoundError``/``PathMissingError``), so ``open_at`` notices the missing remote and falls back
to the remote configured on the default branch (or an explicit URL), with a warning.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ..core.errors import MatryoshkaError

logger = logging.getLogger(__name__)


class RevisionError(MatryoshkaError):
    """A git or DVC operation on a revision failed; the message says which and why."""


RELEASE_REMOTE = "releases"  # release.remote_name's default
RECORDS_DIR = "releases"  # releases/<version>.json: the release records committed in git


def git(root: str | os.PathLike, *args: str, check: bool = True) -> str:
    """Runs ``git -C root args`` and returns stdout (stripped); stderr goes into the error."""
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RevisionError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def repo_root(path: str | os.PathLike = ".") -> Path:
    try:
        return Path(git(path, "rev-parse", "--show-toplevel"))
    except RevisionError:
        raise RevisionError(f"{Path(path).resolve()} is not inside a git repository") from None


def list_tags(repo: str | os.PathLike) -> list[str]:
    """Tag names of a local repository or a git URL (``git ls-remote``, no clone)."""
    out = git(".", "ls-remote", "--tags", "--refs", "--", str(repo))
    return [line.split("refs/tags/", 1)[1] for line in out.splitlines() if "refs/tags/" in line]


def rev_commit(root: str | os.PathLike, rev: str) -> str | None:
    out = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return out or None


def dirty_paths(root: str | os.PathLike) -> list[tuple[str, str]]:
    """``(status, path)`` for every change git sees (``??`` = untracked), paths relative to root."""
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v1", "-z", "--untracked-files=all"],
                         capture_output=True, text=True, check=True).stdout
    entries, items = [], out.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        if not item:
            i += 1
            continue
        status, path = item[:2], item[3:]
        if status[0] in "RC":  # renames carry the old path as the next entry
            i += 1
        entries.append((status, path))
        i += 1
    return entries


def redact(url: str) -> str:
    """A URL with any ``user:password@`` credentials replaced, for logs, errors, commits and Prefect state."""
    import re

    return re.sub(r"(?<=://)[^/@\s]+:[^/@\s]*@", "***:***@", str(url))


def is_local_path(url: str) -> bool:
    """True for plain paths; False for URLs (``s3://``) and scp-like ``user@host:path``."""
    if "://" in url:
        return url.startswith("file://")
    head = url.split("/", 1)[0]
    return not (":" in head and len(head) > 2)  # "C:" drive letters stay paths


def absolute_remote_url(url: str, root: str | os.PathLike) -> str:
    """Local remote paths resolved against the repo root, so clones elsewhere find the same folder."""
    if not is_local_path(url):
        return url
    path = Path(url.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else (Path(root) / path).resolve())


def remote_config(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"core": {"remote": name}, "remote": {name: dict(settings)}}


def release_remote(fs, remote_name: str | None = None, rev: str | None = None) -> str | None:
    """The DVC remote that holds a revision's release data: ``remote_name`` where given; else the one the
    release record of ``rev`` names (``releases/<rev>.json``, written by ``publish``: right even when
    ``-S release.remote_name=...`` or another params file was used); else the revision's params.yaml
    ``release.remote_name`` (default "releases"; records from before the name was kept); each only where
    the revision's DVC config has that remote; else DVC's default remote. (The release remote is never
    the default, so that ``dvc gc -c`` cannot reach it: its name has to come from somewhere else.)"""
    if remote_name:
        return remote_name
    import json

    import yaml

    record = _mapping_at(fs, f"{RECORDS_DIR}/{rev}.json", json.loads) if rev else {}
    release = _mapping_at(fs, "params.yaml", yaml.safe_load).get("release")
    remotes = fs.repo.config["remote"]
    for name in (record.get("remote_name"), release.get("remote_name") if isinstance(release, dict) else None,
                 RELEASE_REMOTE):
        if isinstance(name, str) and name in remotes:
            return name
    return fs.repo.config["core"].get("remote")


def _mapping_at(fs, path: str, parse) -> dict:
    """A JSON/YAML mapping read from the revision ``fs`` shows; {} where missing or unreadable."""
    try:
        raw = parse(fs.read_text(path)) if fs.exists(path) else None
    except Exception as err:  # noqa: BLE001 - unreadable: the caller falls back
        logger.debug("cannot read %s: %s", path, err)
        return {}
    return raw if isinstance(raw, dict) else {}


def open_at(repo: str | os.PathLike, rev: str | None, remote_name: str | None = None,
            remote_url: str | None = None):
    """A ``dvc.api.DVCFileSystem`` of ``repo`` at ``rev`` whose data resolves through the release remote.

    ``remote_url`` forces the remote; otherwise the remote comes from the revision's own config, or,
    when the revision predates it, from the repository's default branch (logged as a warning). With
    no remote anywhere, git-tracked files still read and DVC data comes only from a local cache.
    """
    from dvc.api import DVCFileSystem

    repo = str(repo)
    if remote_url:
        name = remote_name or "releases"
        return DVCFileSystem(repo, rev=rev, config=remote_config(name, {"url": remote_url}))
    fs = DVCFileSystem(repo, rev=rev)
    config = fs.repo.config
    wanted = release_remote(fs, remote_name, rev)
    if wanted and wanted in config["remote"]:
        if wanted == config["core"].get("remote"):
            return fs
        fs.close()
        return DVCFileSystem(repo, rev=rev, config={"core": {"remote": wanted}})
    fs.close()
    head = DVCFileSystem(repo)
    name = release_remote(head, remote_name, rev)
    settings = dict(head.repo.config["remote"].get(name) or {}) if name else {}
    head.close()
    if not settings:  # git-tracked files still read; DVC data only from a local cache
        logger.debug("no DVC remote for %s of %s", rev, repo)
        return DVCFileSystem(repo, rev=rev)
    logger.warning("%s was tagged before DVC remote %r was configured there; using %r from the default branch",
                   rev, name, settings.get("url"))
    return DVCFileSystem(repo, rev=rev, config=remote_config(name, settings))
