"""Release version names: which git tags are releases, their order, and the next name.

A release version is ``v`` + a plain semantic version (``vMAJOR.MINOR.PATCH``, no leading zeros).
That is what DVC's model registry (GTO) accepts in artifact tags (``exit-08-ratio-1@v1.2.3``), so
one name serves both the release tag and ``dvc artifacts get --rev``. Two schemes pick it:

- ``semver``: ``v0.1.0`` first, then the last release with its patch bumped (``v0.1.0 -> v0.1.1``).
- ``date``: ``vYYYY.MMDD.N``, e.g. ``v2026.1123.0`` for the first release on 2026-11-23 (UTC) and
  ``v2026.1123.1`` for a second one that day (``vYYYY.MM.DD`` is not semver: ``01`` has a leading zero).

Versions are ordered as integer triples, so date and semver names compare consistently, and a new
version must be greater than every existing one (history order == version order).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from ..core.errors import InputError

VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class VersionError(InputError):
    """A version name is malformed, already used, or not newer than the last release."""


def parse_version(name: str) -> tuple[int, int, int] | None:
    """``"v1.2.3" -> (1, 2, 3)``; None for tags that are not release versions."""
    match = VERSION_RE.match(name)
    return tuple(int(part) for part in match.groups()) if match else None  # type: ignore[return-value]


def release_versions(tags: Iterable[str]) -> list[str]:
    """The release versions among ``tags``, oldest first."""
    return sorted((t for t in tags if parse_version(t)), key=parse_version)


def last_version(tags: Iterable[str]) -> str | None:
    versions = release_versions(tags)
    return versions[-1] if versions else None


def next_version(existing: Iterable[str], scheme: str, today: dt.date | None = None) -> str:
    """The version the next release gets under ``scheme`` ("date" or "semver")."""
    existing = set(existing)
    last = last_version(existing)
    if scheme == "semver":
        if last is None:
            return "v0.1.0"
        major, minor, patch = parse_version(last)
        return f"v{major}.{minor}.{patch + 1}"
    if scheme != "date":
        raise VersionError(f"unknown version scheme {scheme!r} (date | semver)")
    today = today or dt.datetime.now(dt.timezone.utc).date()
    stem = f"v{today.year}.{today.month * 100 + today.day}"
    n = 0
    while f"{stem}.{n}" in existing:
        n += 1
    candidate = f"{stem}.{n}"
    if last is not None and parse_version(candidate) <= parse_version(last):
        raise VersionError(f"date version {candidate} would not be newer than the last release {last}; "
                           "pass an explicit --version")
    return candidate


def check_new_version(version: str, existing: Iterable[str]) -> str:
    """Validates an explicit or computed version against what was already released."""
    if parse_version(version) is None:
        raise VersionError(f"version {version!r} must look like v1.2.3 (v + semantic version, no leading zeros)")
    existing = set(existing)
    if version in existing:
        raise VersionError(f"version {version} is already taken (released, claimed or abandoned); versions are "
                           "never reused")
    last = last_version(existing)
    if last is not None and parse_version(version) <= parse_version(last):
        raise VersionError(f"version {version} is not newer than the last release {last}")
    return version
