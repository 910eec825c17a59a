"""Serving the release flow (``flows/release.py``) as a scheduled Prefect deployment.

Schedules need a real Prefect server (``prefect server start``; the ephemeral one refuses to
schedule) and a long-lived ``serve`` process; each scheduled run is a subprocess that re-imports the
flow file, from the directory ``serve`` was started in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.errors import InputError

logger = logging.getLogger(__name__)

FLOW_FILE = Path("flows") / "release.py"


class ScheduleError(InputError):
    pass


def flow_file(repo: str | Path = ".") -> Path:
    """``flows/release.py`` of the project, else of the checkout this package runs from."""
    for base in (Path(repo), Path(__file__).resolve().parents[3]):  # <checkout>/src/matryoshka_reranker/release
        if (base / FLOW_FILE).is_file():
            return (base / FLOW_FILE).resolve()
    raise ScheduleError(f"no {FLOW_FILE} in {Path(repo).resolve()} or beside the installed package")


def serve_release(repo: str | Path = ".", params: str = "params.yaml", overrides: list[str] = (),
                  cron: str | None = None, interval: float | None = None, name: str = "scheduled-release",
                  force: bool = False, dry_run: bool = False) -> None:
    """Blocks, serving the release flow on ``cron`` or every ``interval`` seconds (one run at a time)."""
    if (cron is None) == (interval is None):
        raise ScheduleError("give exactly one of --cron or --interval")
    from ..core.environment import configure

    configure()
    for var, value in (("PREFECT_LOGGING_EXTRA_LOGGERS", "matryoshka_reranker"),
                       ("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")):
        os.environ.setdefault(var, value)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API poll otherwise
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import get_current_settings

    from ..config import ParamsError, load_params

    if not get_current_settings().api.url:
        raise ScheduleError("schedules need a running Prefect server: run `prefect server start`, then "
                            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (the ephemeral server cannot schedule)")
    repo = Path(repo).resolve()
    try:
        load_params(repo / params, list(overrides))  # fail now, not at 3 a.m.
    except ParamsError as err:
        raise ScheduleError(str(err)) from None
    flow = load_flow_from_entrypoint(f"{flow_file(repo)}:release")
    request = {"repo": str(repo), "params": params, "overrides": list(overrides), "force": force, "dry_run": dry_run}
    logger.info("serving %s as deployment release/%s (%s)", flow_file(repo), name,
                f"cron {cron!r}" if cron else f"every {interval} s")
    flow.serve(name=name, cron=cron, interval=interval, parameters={"request": request}, limit=1,
               print_starting_message=False)
