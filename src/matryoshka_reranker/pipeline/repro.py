"""Running the DVC pipeline one stage at a time, for an orchestrator (the Prefect release flow).

DVC stays the one executor of stages (``dvc repro <stage>`` in a subprocess, output streamed line
by line); this module only orders the stages from ``dvc.yaml``, times them, and classifies
failures as transient (worth a retry: a held DVC lock, a dropped connection, a killed process) or
not (a failing validation or training run fails the same way again).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TRANSIENT_PATTERNS = re.compile(
    r"unable to acquire lock|lock file|is busy|connection (?:reset|refused|aborted)|timed? ?out|"
    r"temporary failure|resource temporarily unavailable|too many requests|service unavailable|"
    r"remote end closed|broken pipe",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: list[str], transient: bool):
        self.stage, self.returncode, self.tail, self.transient = stage, returncode, tail, transient
        kind = "transient failure" if transient else "failed"
        super().__init__(f"stage {stage} {kind} (exit {returncode}):\n" + "\n".join(tail[-20:]))


@dataclass
class StageRun:
    stage: str
    seconds: float
    reproduced: bool  # False when DVC found the stage up to date


def tool_env() -> dict[str, str]:
    """Child environment: this interpreter's tools first on PATH, telemetry off, and none of the
    torch.distributed / accelerate state a training in this process may have left (a stage starts
    its own workers; an inherited MASTER_PORT may be held by this process's process group)."""
    from ..core.distributed import TRAINING_STATE_VARS
    from ..core.environment import configure

    env = configure({k: v for k, v in os.environ.items() if k not in TRAINING_STATE_VARS})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def pipeline_stages(root: str | Path = ".") -> list[str]:
    """Pipeline stage names (commands only, no ``dvc add`` sources), dependencies first, else file order."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        order = {s: i for i, s in enumerate(stages)}
        graph = repo.index.graph.subgraph(stages)  # edges point from a stage to what it depends on
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: order[s])
        return [s.addressing for s in ordered]


def has_remote(root: str | Path = ".") -> bool:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.config["remote"])


def run_dvc(root: str | Path, args: list[str], on_line: Callable[[str], None] = logger.info,
            label: str = "dvc") -> tuple[int, list[str]]:
    """Runs ``dvc args`` in ``root``, passing each output line to ``on_line``; returns (exit code, tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=tool_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail.append(line)
            on_line(f"[{label}] {line}")
    return proc.wait(), list(tail)


KILLED = re.compile(r"exited with (-9|137)\b")  # SIGKILL, as DVC reports a stage's command
STOPPED = re.compile(r"exited with (-15|143)\b")  # SIGTERM


def _transient(returncode: int, tail: list[str]) -> bool:
    """SIGTERM (a preempted or stopped worker) is worth a retry; SIGKILL (137) is usually the OOM
    killer, and rerunning the same stage on the same machine would only be killed again."""
    if returncode in (137, -9) or any(KILLED.search(line) for line in tail):
        return False
    stopped = returncode in (143, -15) or any(STOPPED.search(line) for line in tail)
    return stopped or any(TRANSIENT_PATTERNS.search(line) for line in tail)


def run_stage(root: str | Path, stage: str, force: bool = False,
              on_line: Callable[[str], None] = logger.info) -> StageRun:
    """``dvc repro <stage>`` (``-f -s`` with force); raises ``StageFailed`` with the output's tail."""
    args = ["repro", *(["--force", "--single-item"] if force else []), stage]
    ran = []  # DVC's "Running stage" comes before the command's output, which may outrun the tail

    def watch(line: str) -> None:
        if not ran and "Running stage" in line:
            ran.append(line)
        on_line(line)

    start = time.perf_counter()
    code, tail = run_dvc(root, args, watch, label=stage)
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(stage, code, tail, _transient(code, tail))
    return StageRun(stage, seconds, reproduced=bool(ran))


def pull(root: str | Path = ".", on_line: Callable[[str], None] = logger.info) -> bool:
    """``dvc pull --allow-missing`` when a remote is configured (outputs a remote lacks are rebuilt)."""
    if not has_remote(root):
        logger.info("no DVC remote configured: nothing to pull")
        return False
    code, tail = run_dvc(root, ["pull", "--allow-missing"], on_line, label="pull")
    if code != 0:
        raise StageFailed("pull", code, tail, _transient(code, tail))
    return True


def write_overrides(params_path: str | Path, overrides: list[str]) -> None:
    """Applies ``dotted.key=value`` overrides to params.yaml in place (comments kept), validated first."""
    import io
    import json

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    from ..config import apply_override, parse_params
    from ..core.atomic import atomic_file

    if not overrides:
        return
    path = Path(params_path)
    ryaml = YAML()
    ryaml.width = 4096  # never re-wrap long lines
    ryaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = ryaml.load(path.read_text(encoding="utf-8")) or {}
    for override in overrides:
        apply_override(doc, override)
        *parents, leaf = override.partition("=")[0].strip().split(".")
        node = doc
        for part in parents:
            node = node[part]
        if isinstance(node[leaf], list):  # keep lists on one line, like the rest of params.yaml
            seq = CommentedSeq(node[leaf])
            seq.fa.set_flow_style()
            node[leaf] = seq
    parse_params(json.loads(json.dumps(doc, default=str)), source=f"{path} + overrides")  # raises ParamsError
    buffer = io.StringIO()
    ryaml.dump(doc, buffer)
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(buffer.getvalue())


@contextlib.contextmanager
def overridden_params(params_path: str | Path, overrides: list[str]):
    """params.yaml with ``overrides`` written in for one run, restored afterwards unless the run keeps them.

    Yields ``keep``: call it once the overrides became part of a release (committed with it); otherwise
    the file's earlier text comes back (atomically) however the run ended, so a failed or dry run
    leaves the checkout as it found it. Bad overrides raise before anything is written.
    """
    from ..core.atomic import atomic_file

    path = Path(params_path)
    original = path.read_text(encoding="utf-8")
    write_overrides(path, overrides)
    kept = []
    try:
        yield lambda: kept.append(True)
    finally:
        if overrides and not kept and path.read_text(encoding="utf-8") != original:
            with atomic_file(path, encoding="utf-8") as handle:
                handle.write(original)
