"""The release flow: ``dvc pull`` -> ``dvc repro`` stage by stage -> gate -> publish, run by Prefect.

Prefect orchestrates DVC, never the reverse (a DVC stage that started Prefect would pay a server
start in every stage). All logic lives in ``matryoshka_reranker`` (``repro``, ``gate``, ``release``);
this file only wires it into tasks with retries, streamed logs, timings and artifacts. (No
``from __future__ import annotations``: Prefect resolves the parameter model from the annotation when a
scheduled run loads this file by path.)

Run once:      python flows/release.py                     (ephemeral Prefect server, ~20 s to start)
On a schedule: prefect server start  &&  export PREFECT_API_URL=http://127.0.0.1:4200/api
               matryoshka schedule --cron "0 3 * * 0"      (long-lived; each run is a subprocess)
"""

from pathlib import Path
from typing import Optional

from matryoshka_reranker.core.environment import configure

configure()  # telemetry off before prefect is imported: it reads DO_NOT_TRACK at import time

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import repro  # noqa: E402
from matryoshka_reranker.release.gate import metrics_rows, read_metrics, run_gate  # noqa: E402
from matryoshka_reranker.release.registry import check_artifacts_in_sync, publish  # noqa: E402


class ReleaseRequest(BaseModel):
    """Parameters of one release run (validated by Prefect before the run starts)."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(".", description="the project checkout (git + DVC) to reproduce and release")
    params: str = Field("params.yaml", description="params file, relative to repo")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value, written into params "
                                 "for this run (committed with the release, restored otherwise)")
    force: bool = Field(False, description="re-run every stage even if DVC finds it up to date")
    dry_run: bool = Field(False, description="reproduce and gate, but publish nothing")
    version: Optional[str] = Field(None, description="explicit release version (default: release.version_scheme)")


def _retry_transient(task, task_run, state) -> bool:
    """Retry only what may pass next time (a held lock, a dropped connection), not a deterministic failure."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, repro.StageFailed) and err.transient


@task(name="dvc-pull", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def pull_data(repo: str) -> bool:
    return repro.pull(repo, on_line=get_run_logger().info)


@task(name="dvc-repro", task_run_name="repro-{stage}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def reproduce_stage(repo: str, stage: str, force: bool) -> dict:
    run = repro.run_stage(repo, stage, force=force, on_line=get_run_logger().info)
    get_run_logger().info("stage %s: %s in %.1f s", stage, "reproduced" if run.reproduced else "up to date",
                          run.seconds)
    return {"stage": run.stage, "seconds": round(run.seconds, 2), "reproduced": run.reproduced}


@task(name="gate")
def gate(repo: str, params_path: str) -> dict:
    params = load_params(Path(repo) / params_path)
    rows = metrics_rows(read_metrics(Path(repo) / params.paths.metrics), params.evaluation.measures)
    create_table_artifact(rows, key="per-layer-metrics", description="Quality per exit layer x ratio (this run)")
    report = run_gate(params, repo)
    create_markdown_artifact(report.to_markdown(), key="gate-report", description="Release gate vs last release")
    report.raise_if_failed(params.paths.gate_report)
    return report.to_dict()


@task(name="publish")
def publish_release(repo: str, params_path: str, version: Optional[str], dry_run: bool) -> dict:
    result = publish(load_params(Path(repo) / params_path), repo, version=version, dry_run=dry_run)
    get_run_logger().info("publish: %s %s", result.status, result.version)
    return result.to_dict()


@flow(name="release", persist_result=True)
def release(request: ReleaseRequest = ReleaseRequest()) -> dict:
    """Reproduce the pipeline, gate every exit layer against the last release, publish if it passes."""
    logger = get_run_logger()
    repo, params_path = request.repo, request.params
    params_file = Path(repo) / params_path
    with repro.overridden_params(params_file, request.overrides) as keep:  # bad overrides fail here, first
        check_artifacts_in_sync(load_params(params_file), repo)
        pull_data(repo)
        runs = [reproduce_stage(repo, stage, request.force) for stage in repro.pipeline_stages(repo)]
        create_table_artifact(runs, key="stage-durations", description="dvc repro, one task per stage")
        report = gate(repo, params_path)
        result = publish_release(repo, params_path, request.version, request.dry_run)
        if result["status"] == "published":
            keep()  # the overrides live on in the release's commit
        logger.info("release flow done: %s", result)
        return {"stages": runs, "gate": {"passed": report["passed"], "regressions": report["regressions"]},
                **result}

if __name__ == "__main__":
    release()
