"""Release records: one JSON file per published version in the release remote (``releases/<version>.json``).

The record is the release's ledger entry, and the one place both ``publish`` (claiming a
version) and the gate (finding the baseline) read, so a clone without tags sees what the clone
that published saw. It holds the commit, the policy the gate applied, the eval set's identity,
the per-layer metrics with per-query values (the next gate's paired test), and the sha256 of every
released file. The same content minus the commit is committed in git as ``releases/<version>.json``
in the release commit: ``download`` verifies files against *that* copy, which whoever can write
the remote cannot also rewrite.

Claiming is atomic: on a local remote the record is created with ``O_CREAT | O_EXCL`` (the loser of
two concurrent publishes gets "already claimed"); on object stores it is written only if absent
and read back to confirm this publish's nonce (object stores offer no exclusive create through
fsspec; the window is documented in docs/release.md). Rolling back removes a record only if it
still holds this publish's nonce, so a loser never deletes the winner's record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from ..core.errors import MatryoshkaError
from .revisions import RECORDS_DIR, absolute_remote_url, is_local_path, list_tags, redact
from .versions import parse_version, release_versions

RECORD_FORMAT_VERSION = 2
UNRELEASED = ("claimed", "abandoned")  # record statuses of versions that are not releases (no baseline, no download)

logger = logging.getLogger(__name__)


class RecordError(MatryoshkaError):
    """A release record is missing, unreadable or already claimed."""


class RecordStore:
    """The ``releases/`` folder of the release remote, through fsspec (local, s3://, gs://, ssh://)."""

    def __init__(self, url: str, git_remote_url: str | None = None, local_repo: Path | None = None):
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.folder = f"{root.rstrip('/')}/{RECORDS_DIR}"
        self.local = is_local_path(url)
        self.git_remote_url, self.local_repo = git_remote_url, local_repo

    @classmethod
    def from_params(cls, params, repo: str | Path = ".") -> RecordStore:
        from .revisions import git

        repo = Path(repo)
        git_remote = params.release.git_remote
        git_url = git(repo, "remote", "get-url", "--", git_remote) if git_remote else None
        return cls(absolute_remote_url(params.release.remote_url, repo), git_url, repo)

    def path(self, version: str) -> str:
        return f"{self.folder}/{version}.json"

    def versions(self) -> list[str]:
        """Versions recorded in the remote, oldest first."""
        try:
            names = [Path(p).name for p in self.fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return []
        return release_versions([n.removesuffix(".json") for n in names if n.endswith(".json")])

    def known_versions(self) -> list[str]:
        """Every version published: records in the release remote and tags at ``release.git_remote``.

        Local tags alone do not make a release (a hand-made tag, or a clone's stale tag); they only
        keep new version names from colliding (``taken_versions``).
        """
        versions = set(self.versions())
        if self.git_remote_url:
            versions |= set(release_versions(list_tags(self.git_remote_url)))
        return sorted(versions, key=parse_version)

    def taken_versions(self) -> list[str]:
        """Names a new release may not use: every known version and every local version tag."""
        versions = set(self.known_versions())
        if self.local_repo is not None:
            versions |= set(release_versions(list_tags(self.local_repo)))
        return sorted(versions, key=parse_version)

    def latest_version(self, params=None) -> str | None:
        """The last *published* version (the gate's baseline): a version whose record is still a publish's claim
        (unfinished, or killed before its release commit) or was abandoned (``publish --abandon``) was never
        released and is skipped, as ``download --version latest`` skips it; a known version whose record cannot
        be read raises (``read``)."""
        for version in reversed(self.known_versions()):
            status = self.read(version).get("status")
            if status not in UNRELEASED:
                return version
            logger.warning("release %s: its publish %s (record: %s); not a baseline", version,
                           "was abandoned" if status == "abandoned" else "has not finished", status)
        return None

    def read(self, version: str) -> dict[str, Any]:
        """The record of ``version``; a release known (by tag) but unrecorded is an error, never "none"."""
        try:
            with self.fs.open(self.path(version), "rb") as handle:
                record = json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            raise RecordError(f"release {version} exists (tag or record list) but its record "
                              f"{RECORDS_DIR}/{version}.json is missing from the release remote {redact(self.url)}; "
                              "the gate cannot find its baseline and refuses to treat this as a first release") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"release {version}: record unreadable in {redact(self.url)} ({err})") from None
        if not isinstance(record, dict) or record.get("version") != version:
            raise RecordError(f"release {version}: record in {redact(self.url)} is malformed")
        return record

    def claim(self, version: str, record: dict[str, Any], nonce: str | None = None) -> str:
        """Creates the record of ``version`` atomically; returns this claim's nonce (``nonce`` where the
        caller chose it first, to journal it before the claim exists). Refuses a taken version."""
        nonce = nonce or secrets.token_hex(16)
        payload = (json.dumps({**record, "format_version": RECORD_FORMAT_VERSION, "version": version,
                               "claim": nonce}, indent=2) + "\n").encode()
        path = self.path(version)
        self.fs.makedirs(self.folder, exist_ok=True)
        if self.local:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise RecordError(f"version {version} is already claimed in the release remote; released "
                                  "versions are immutable (another publish may have just taken it)") from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            if self.fs.exists(path):
                raise RecordError(f"version {version} is already claimed in the release remote {redact(self.url)}")
            self.fs.pipe_file(path, payload)
            if self.read(version).get("claim") != nonce:
                raise RecordError(f"version {version} was claimed concurrently by another publish")
        return nonce

    def update(self, version: str, nonce: str, changes: dict[str, Any]) -> None:
        """Adds fields to our own claim (e.g. the commit once it exists)."""
        record = self.read(version)
        if record.get("claim") != nonce:
            raise RecordError(f"version {version}: the record is not this publish's claim; not touching it")
        record.update(changes)
        tmp = f"{self.path(version)}.tmp-{nonce[:8]}"
        self.fs.pipe_file(tmp, (json.dumps(record, indent=2) + "\n").encode())
        self.fs.mv(tmp, self.path(version))

    def release(self, version: str, nonce: str) -> bool:
        """Removes the record only if it is still this publish's claim (rollback); True when removed."""
        try:
            record = self.read(version)
        except RecordError:
            return False
        if record.get("claim") != nonce:
            return False
        self.fs.rm_file(self.path(version))
        return True
