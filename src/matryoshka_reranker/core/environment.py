"""The process environment every entry point sets first: offline, no telemetry, quiet threads.

One place for it (the CLI, the Prefect flow, the scheduler and child processes all call
``configure``): no hub downloads at run time, analytics of DVC, Prefect and Great Expectations off,
and OpenMP threads that sleep at barriers (spinning workers made a 2-thread forward 6x slower on a
shared 2-core machine, docs/export.md). Values already set by the user win. It must run before
torch, prefect or great_expectations are imported, since they read these at import time.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def configure(environ: dict | None = None) -> dict:
    """Sets the defaults (without overriding) in ``environ`` (default ``os.environ``); returns it."""
    target = os.environ if environ is None else environ
    for name, value in DEFAULTS.items():
        target.setdefault(name, value)
    return target
