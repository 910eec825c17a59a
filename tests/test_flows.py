"""The Prefect release flow, end to end on the fake project, and a scheduled deployment on a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Prefect reads these when first imported: keep its home, database and logs in a throwaway place
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import httpx  # noqa: E402
import pytest  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.exceptions import ParameterTypeError  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.release import ReleaseRequest, release, reproduce_stage  # noqa: E402
from matryoshka_reranker.pipeline import repro  # noqa: E402
from tests.dvc_project import dvc, git, make_project, set_knobs  # noqa: E402

WORKTREE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1]


def test_release_flow_reproduces_gates_and_publishes(harness, tmp_path):
    root, params = make_project(tmp_path)
    result = release(ReleaseRequest(repo=str(root)))
    assert result["status"] == "published" and result["version"] == "v0.1.0"
    assert [r["stage"] for r in result["stages"]] == ["prepare", "export", "evaluate"]  # dependency order
    assert all(r["reproduced"] and r["seconds"] > 0 for r in result["stages"])
    assert result["gate"] == {"passed": True, "regressions": []}
    assert "v0.1.0" in git(root, "tag").splitlines()
    assert "Release gate: PASSED" in _artifact("gate-report").data
    table = json.loads(_artifact("per-layer-metrics").data)
    assert {row["config"] for row in table} == {"exit-04-ratio-1", "exit-04-ratio-2", "exit-06-ratio-1",
                                                 "exit-06-ratio-2"}
    durations = json.loads(_artifact("stage-durations").data)
    assert [row["stage"] for row in durations] == ["prepare", "export", "evaluate"]

    # nothing changed: stages are up to date and there is nothing to publish
    again = release(ReleaseRequest(repo=str(root)))
    assert again["status"] == "unchanged" and not any(r["reproduced"] for r in again["stages"])

    # a regression on one exit layer: the flow fails at the gate, nothing is published
    set_knobs(root, delta={"exit-06-ratio-1": -0.2})
    state = release(ReleaseRequest(repo=str(root)), return_state=True)
    assert state.is_failed()
    assert "exit-06-ratio-1" in _artifact("gate-report").data and "FAILED" in _artifact("gate-report").data
    assert [t for t in git(root, "tag").splitlines() if "@" not in t] == ["v0.1.0"]

    # overrides (not of the gate policy, which publish refuses) go into params.yaml for the run and are
    # restored when nothing is published (dry run)
    set_knobs(root, delta={})
    before = (root / "params.yaml").read_text()
    dry = release(ReleaseRequest(repo=str(root), overrides=["export.opset=18"], dry_run=True, force=True))
    assert dry["status"] == "unchanged"  # no stage of the fake pipeline reads export.opset: same outputs
    assert all(r["reproduced"] for r in dry["stages"])  # force re-runs every stage
    assert (root / "params.yaml").read_text() == before


def test_release_flow_validates_its_parameters(harness, tmp_path):
    with pytest.raises(ParameterTypeError):
        release(request={"repo": str(tmp_path), "force": "sometimes"})
    with pytest.raises(ParameterTypeError):
        release(request={"repo": str(tmp_path), "unknown_option": 1})


def test_bad_override_fails_before_any_stage_runs(harness, tmp_path):
    root, _ = make_project(tmp_path, git_remote=False)
    state = release(ReleaseRequest(repo=str(root), overrides=["export.ratios=[3]"]), return_state=True)
    assert state.is_failed() and "token adapter" in str(state.result(raise_on_failure=False))
    assert not (root / "dvc.lock").exists()



def test_overridden_params_restore_unless_kept(tmp_path):
    """The release flow's overrides live for one run: restored after a failure or a dry run, kept if published."""
    params = tmp_path / "params.yaml"
    params.write_text("# my comment\nexport:\n  opset: 17\n", encoding="utf-8")
    original = params.read_text(encoding="utf-8")
    with pytest.raises(RuntimeError, match="stage failed"):
        with repro.overridden_params(params, ["export.opset=18"]):
            assert "opset: 18" in params.read_text(encoding="utf-8")
            raise RuntimeError("stage failed")
    assert params.read_text(encoding="utf-8") == original
    with repro.overridden_params(params, ["export.opset=18"]):
        pass  # a dry run: nothing kept
    assert params.read_text(encoding="utf-8") == original
    with repro.overridden_params(params, ["export.opset=18"]) as keep:
        keep()
    assert "opset: 18" in params.read_text(encoding="utf-8") and "# my comment" in params.read_text(encoding="utf-8")
    before = params.read_text(encoding="utf-8")
    with pytest.raises(Exception, match="ratios"):  # a bad override raises before anything is written
        with repro.overridden_params(params, ["export.ratios=[3]"]):
            pytest.fail("the body must not run")
    assert params.read_text(encoding="utf-8") == before


FLAKY_STAGE = """\
import sys
from pathlib import Path
attempts = Path("attempts.txt")
n = int(attempts.read_text()) + 1 if attempts.exists() else 1
attempts.write_text(str(n))
if sys.argv[1] == "transient" and n == 1:
    sys.exit("ConnectionResetError: Connection reset by peer")
if sys.argv[1] == "broken":
    sys.exit("ValueError: training data failed validation")
if sys.argv[1] == "oom":  # what the OOM killer does: SIGKILL, exit 137
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "stopped" and n == 1:  # a preempted worker: SIGTERM
    import os, signal
    os.kill(os.getpid(), signal.SIGTERM)
Path("out.txt").write_text("ok")
"""


@pytest.mark.parametrize("mode, attempts, ok", [("transient", 2, True), ("broken", 1, False), ("oom", 1, False),
                                                ("stopped", 2, True)])
def test_stage_retries_only_transient_failures(harness, tmp_path, mode, attempts, ok):
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    (tmp_path / "flaky.py").write_text(FLAKY_STAGE)
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  flaky:\n    cmd: python flaky.py {mode}\n    outs: [out.txt]\n")

    @flow
    def one_stage():
        return reproduce_stage.with_options(retry_delay_seconds=0)(str(tmp_path), "flaky", False)

    state = one_stage(return_state=True)
    assert state.is_completed() == ok
    assert int((tmp_path / "attempts.txt").read_text()) == attempts
    if not ok:
        err = state.result(raise_on_failure=False)
        assert isinstance(err, repro.StageFailed) and not err.transient
        if mode == "broken":
            assert "failed validation" in str(err)
        else:  # the shell reports a SIGKILL as 137, a direct exec as -9
            assert "exited with -9" in str(err) or "exited with 137" in str(err)


def test_a_stage_with_long_output_is_reported_as_reproduced(tmp_path):
    """DVC prints "Running stage" before the command's output; a training stage logs far more lines than
    the failure tail keeps, and must still not be reported "up to date" (stage-durations artifact, logs)."""
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    (tmp_path / "chatty.py").write_text("from pathlib import Path\nfor i in range(500):\n    print('step', i)\n"
                                        "Path('out.txt').write_text('ok')\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  chatty:\n    cmd: python chatty.py\n    outs: [out.txt]\n")
    lines = []
    run = repro.run_stage(tmp_path, "chatty", on_line=lines.append)
    assert len(lines) > 500 and run.reproduced
    assert not repro.run_stage(tmp_path, "chatty", on_line=lines.append).reproduced  # now up to date


# --- a scheduled deployment on a real `prefect server start` -------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stops a process group this test started (server or serve, with their children)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _poll(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[:4]} exited with {proc.returncode} while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_scheduled_deployment_runs_against_a_real_server(tmp_path):
    root, _ = make_project(tmp_path)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               DVC_NO_ANALYTICS="1", PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PYTHONPATH=os.pathsep.join([str(WORKTREE / "src"), str(WORKTREE)]))
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, cwd=tmp_path, start_new_session=True,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    serve = None
    try:
        def healthy():
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _poll(healthy, 120, "the Prefect server", [server])
        serve = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "schedule", "--repo", str(root),
                                  "--interval", "3", "--name", "test-schedule"],
                                 env={**env, "PREFECT_API_URL": api}, cwd=tmp_path, start_new_session=True,
                                 stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT)

        def finished_runs():
            runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": [
                "COMPLETED", "FAILED", "CRASHED"]}}}}, timeout=5).json()
            return [r for r in runs if r.get("deployment_id")]

        try:
            runs = _poll(finished_runs, 180, "a scheduled run to finish", [server, serve])
        except AssertionError:
            print((logs / "serve.log").read_text()[-5000:])
            raise
        assert runs[0]["state"]["type"] == "COMPLETED", (logs / "serve.log").read_text()[-5000:]
        deployment = httpx.get(f"{api}/deployments/{runs[0]['deployment_id']}", timeout=5).json()
        assert deployment["name"] == "test-schedule" and deployment["schedules"][0]["schedule"]["interval"] == 3
        assert deployment["parameters"]["request"]["repo"] == str(root)
        assert "v0.1.0" in git(root, "tag").splitlines()  # the scheduled run published
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
    assert server.poll() is not None and (serve is None or serve.poll() is not None)
