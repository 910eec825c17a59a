"""Fault drills with real processes and real signals (SIGKILL, not KeyboardInterrupt).

Each drill starts a stage as a subprocess, kills it with SIGKILL at a point where it holds partial
state, reruns it, and checks: the same final result as an uninterrupted run, no temporary
leftovers, and (for publish) the last release intact. The results table is in docs/release.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.dvc_project import git, make_project, repro
from tests.train_fixtures import TRAIN_ROWS, tiny_params, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)


def cli(params_file: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", *args, "-p", str(params_file)],
                            env=ENV, cwd=params_file.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL ``process`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            return True
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("the drill's kill point never came")


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp-*")) + sorted(p.name for p in folder.rglob(".*old-*"))


def _parses(path: Path) -> bool:
    """The checkpoint is complete once its trainer_state.json reads whole (a kill mid-write leaves a cut-short
    file, which resume rightly skips: the drill would then test a fresh start, not a resume)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def tiny_project(tmp_path, llama_dir, **sections) -> tuple[Path, object]:
    write_jsonl(tmp_path / "scored.jsonl", TRAIN_ROWS)
    write_jsonl(tmp_path / "groups.jsonl", [{k: v for k, v in r.items() if not k.endswith("_scores")}
                                            for r in TRAIN_ROWS * 3])
    params = tiny_params(tmp_path, llama_dir, **sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump()))
    return path, params


def test_sigkill_during_self_distillation_resumes_to_the_same_adapter(tmp_path, llama_dir):
    results = {}
    for name in ("killed", "straight"):
        folder = tmp_path / name
        folder.mkdir()
        params_file, params = tiny_project(folder, llama_dir, self_distill__max_steps=6, self_distill__save_steps=2)
        process = cli(params_file, "self-distill")
        if name == "killed":
            checkpoint = folder / "checkpoints" / "self_distill" / "checkpoint-2" / "trainer_state.json"
            assert kill_when(process, lambda: _parses(checkpoint)), "training finished before the kill"
            assert not (folder / "self_distill").exists()
            process = cli(params_file, "self-distill")
        finish(process)
        log = json.loads((folder / "self_distill" / "training_log.json").read_text())
        assert (log["resumed_from"] is None) == (name == "straight")
        results[name] = load_file(folder / "self_distill" / "adapter_model.safetensors")
        assert leftovers(folder) == []
    for key in results["straight"]:
        assert (results["killed"][key] - results["straight"][key]).abs().max() < 1e-5, key


def test_sigkill_during_teacher_scoring_resumes_shard_by_shard(tmp_path, llama_dir):
    outputs = {}
    for name in ("killed", "straight"):
        folder = tmp_path / name
        folder.mkdir()
        params_file, params = tiny_project(folder, llama_dir, teacher__shard_size=1)
        # enough one-line shards that the scoring cannot finish between the first shard and the kill
        # (with 3x the rows and 2-line shards a fast CPU wrote them all within the 20 ms poll)
        write_jsonl(folder / "groups.jsonl", [{k: v for k, v in r.items() if not k.endswith("_scores")}
                                              for r in TRAIN_ROWS * 30])
        (folder / "scored.jsonl").unlink()
        process = cli(params_file, "teacher-score")
        if name == "killed":
            first = folder / "shards" / "shard-00000.json"
            assert kill_when(process, first.exists), "scoring finished before the kill"
            assert not (folder / "scored.jsonl").exists()  # no partial output
            process = cli(params_file, "teacher-score")
        finish(process)
        outputs[name] = (folder / "scored.jsonl").read_text()
        assert leftovers(folder) == []
    assert outputs["killed"] == outputs["straight"]


def test_sigkill_during_export_leaves_the_last_export_and_a_rerun_cleans_up(tmp_path, llama_dir):
    from matryoshka_reranker.training.compensation import compensate
    from matryoshka_reranker.training.trainer import self_distill

    onnx = tmp_path / "onnx"
    params_file, params = tiny_project(tmp_path, llama_dir, self_distill__max_steps=1, self_distill__save_steps=1,
                                       export__exit_layers=[2, 4], export__ratios=[1, 2],
                                       export__calibration_queries=0, paths__onnx=str(onnx))
    self_distill(params)
    compensate(params)
    finish(cli(params_file, "export"))
    before = json.loads((onnx / "index.json").read_text())
    manifests = {p.parent.name: p.read_text() for p in onnx.glob("*/manifest.json")}
    process = cli(params_file, "export")
    assert kill_when(process, lambda: any(tmp_path.glob(".onnx.tmp-*/ratio-*/.all-exits-debug.onnx")))
    assert json.loads((onnx / "index.json").read_text()) == before  # the last good export is in place
    assert list(tmp_path.glob(".onnx.tmp-*"))  # the killed run's temporary is still there ...
    finish(cli(params_file, "export"))
    assert not list(tmp_path.glob(".onnx.tmp-*"))  # ... until the next export removes it
    after = {p.parent.name: json.loads(p.read_text()) for p in onnx.glob("*/manifest.json")}
    assert set(after) == set(manifests)
    for name, manifest in after.items():  # same model bytes (export is deterministic)
        assert manifest["files"] == json.loads(manifests[name])["files"], name


def test_sigkill_during_publish_then_rerun_completes_the_release(tmp_path):
    root, params = make_project(tmp_path)
    repro(root)
    params_file = root / "params.yaml"
    journal = root / ".git" / "matryoshka-publish.json"
    process = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "publish", "--repo", str(root),
                                "-p", str(params_file)], env=ENV, cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def committed() -> bool:
        try:
            return "commit" in json.loads(journal.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    killed = kill_when(process, committed)
    rerun = subprocess.run([sys.executable, "-m", "matryoshka_reranker.cli", "publish", "--repo", str(root),
                            "-p", str(params_file)], env=ENV, cwd=root, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    status = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert status["version"] == "v0.1.0" and status["status"] == ("published" if killed else "unchanged")
    record = json.loads((tmp_path / "dvc-remote" / "releases" / "v0.1.0.json").read_text())
    assert record["status"] == "published" and record["commit"] == git(root, "rev-parse", "v0.1.0^{commit}")
    assert "refs/tags/v0.1.0" in git(root, "ls-remote", "--tags", "origin")
    assert not journal.exists() and not (root / ".git" / "matryoshka-publish.lock").exists()
    assert [line for line in git(root, "log", "--format=%s").splitlines() if line.startswith("Release")] == [
        "Release v0.1.0"]  # one release commit, not two
