"""Atomic writes: readers see old or new, concurrent writers lose nothing, stale temporaries go, umask holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from matryoshka_reranker.core.atomic import (
    atomic_dir,
    atomic_file,
    clean_stale_temporaries,
)


def test_failed_write_leaves_the_last_good_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert (target / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_writers_keep_the_target_and_leak_nothing(tmp_path):
    target = tmp_path / "out"
    errors = []

    def write(i):
        try:
            for _ in range(20):
                with atomic_dir(target) as tmp:
                    (tmp / "who.txt").write_text(str(i))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (target / "who.txt").read_text() in {"0", "1", "2", "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_of_killed_processes_are_cleaned_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".out.tmp-{dead}-abc123"
    stale_dir.mkdir()
    stale_file = tmp_path / f".scores.json.tmp-{dead}-xyz"
    stale_file.write_text("partial")
    live = tmp_path / f".out.tmp-{os.getpid()}-mine"  # a live writer's temporary is left alone
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    with atomic_file(tmp_path / "scores.json") as handle:
        handle.write("{}")
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()
    clean_stale_temporaries(tmp_path / "out")
    assert live.exists()


def test_written_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
        with atomic_file(tmp_path / "f.json") as handle:
            handle.write("{}")
    finally:
        os.umask(old)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "f.json").stat().st_mode & 0o777) == "0o644"
