"""The real dvc.yaml, end to end with `dvc repro`, on a tiny model and a tiny BEIR folder.

Every stage is the real `matryoshka <stage>` command (real GX, training, torch.onnx export, ONNX
Runtime evaluation); only the sizes are small. Checks the issue's acceptance: a second repro is a
no-op, a param change dirties only what depends on it, `dvc params diff` / `dvc metrics show` work,
and corrupt training data stops the pipeline at `validate` with earlier outputs intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import dvc, git
from tests.train_fixtures import TRAIN_ROWS, write_beir, write_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"exit-02-ratio-1", "exit-04-ratio-1", "exit-02-ratio-2", "exit-04-ratio-2",
           "exit-02-ratio-1-specialist"}  # the exit-2 specialist (specialize stage) is evaluated like the rest

TINY = {  # dotted key -> value, applied to the repo's own params.yaml
    "data.beir_dir": "data/tiny", "data.train_queries": 0, "data.negatives_per_query": 2,
    "data.eval_queries": 0, "data.eval_candidates": 3,
    "model.name_or_path": "tiny-model", "model.start_layer": 1, "model.query_max_len": 12,
    "model.passage_max_len": 20,
    "teacher.kind": "matryoshka", "teacher.name_or_path": "tiny-model", "teacher.batch_size": 4,
    "teacher.max_length": 32, "teacher.shard_size": 2,
    "compression.layers": [2], "compression.ratios": [1, 2],
    "self_distill.max_steps": 2, "self_distill.save_steps": 2, "self_distill.train_group_size": 3,
    "self_distill.deepspeed": None, "self_distill.lora.rank": 4, "self_distill.lora.alpha": 8,
    "compensation.token_ratios": [2],
    "compensation.layer.max_steps": 1, "compensation.layer.save_steps": 1, "compensation.layer.deepspeed": None,
    "compensation.token.max_steps": 1, "compensation.token.save_steps": 1, "compensation.token.deepspeed": None,
    "specialist.exits": [2], "specialist.max_steps": 2, "specialist.save_steps": 2,
    "specialist.train_group_size": 3, "specialist.deepspeed": None, "specialist.bf16_autocast": False,
    "specialist.lora.rank": 4, "specialist.lora.alpha": 8,
    "export.exit_layers": [2, 4], "export.ratios": [1, 2], "export.compress_layers": [2],
    "evaluation.batch_size": 4, "evaluation.pytorch_check_queries": 0, "evaluation.threads": 1,
    "validation.min_passage_chars": 5,
}


def set_params(path: Path, changes: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory, llama_dir):
    """A git + DVC project with the repo's dvc.yaml, code and configs, reproduced once."""
    root = tmp_path_factory.mktemp("pipeline")
    for item in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / item, root / item)
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copytree(REPO / "src" / "matryoshka_reranker", root / "src" / "matryoshka_reranker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(llama_dir, root / "tiny-model")
    write_beir(root / "data" / "tiny")
    set_params(root / "params.yaml", TINY)
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny pipeline")
    first = dvc(root, "repro")
    return root, first.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_repro_runs_every_stage_then_is_a_no_op(project):
    root, log = project
    for stage in ("prepare", "validate", "teacher_score", "self_distill", "compensate", "specialize", "export",
                  "baselines", "evaluate"):
        assert f"Running stage '{stage}'" in log
    assert json.loads((root / "reports/validation/summary.json").read_text())["success"] is True
    assert (root / "reports/validation/index.html").exists()  # GX Data Docs
    assert (root / "models/compensation/token-ratio-2/adapter_config.json").exists()
    index = json.loads((root / "models/onnx/index.json").read_text())
    assert {m["name"] for m in index["models"]} == CONFIGS
    metrics = json.loads((root / "metrics/per_layer.json").read_text())
    assert set(metrics["configs"]) == CONFIGS and metrics["pytorch_check"]["passed"]
    specialist = metrics["configs"]["exit-02-ratio-1-specialist"]
    assert specialist["variant"] == "specialist" and specialist["of"] == "exit-02-ratio-1"
    assert json.loads((root / "models/specialists/specialists.json").read_text())["exits"] == [2]
    assert metrics["eval"]["identity"]["queries"] == metrics["eval"]["queries"]
    per_query = json.loads((root / "metrics/per_query.json").read_text())["systems"]
    assert CONFIGS | {"bm25", "random"} == set(per_query)
    assert (root / "models/self_distill/input_format.json").exists()  # the model carries its format
    assert {"quality_vs_exit_layer.png", "quality_vs_latency.png"} <= {p.name for p in (root / "metrics/plots").iterdir()}

    lock = (root / "dvc.lock").read_bytes()
    again = dvc(root, "repro")
    assert "Data and pipelines are up to date" in again.stdout and "Running stage" not in again.stdout
    assert (root / "dvc.lock").read_bytes() == lock  # a no-op: nothing re-ran, nothing re-recorded

    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    values = shown[""]["data"]["metrics/per_layer.json"]["data"]["configs"]  # "": the workspace
    assert values["exit-04-ratio-2"]["nDCG@10"] == metrics["configs"]["exit-04-ratio-2"]["nDCG@10"]
    summary = shown[""]["data"]["metrics/summary.json"]["data"]
    assert summary["exit-04-ratio-2_nDCG@10"] == metrics["configs"]["exit-04-ratio-2"]["nDCG@10"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_param_change_dirties_only_its_dependants(project):
    root, _ = project
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "reproduced")
    original = (root / "params.yaml").read_text()
    try:
        set_params(root / "params.yaml", {"evaluation.batch_size": 2})
        diff = json.loads(dvc(root, "params", "diff", "--json").stdout)
        assert diff["params.yaml"]["evaluation.batch_size"] == {"old": 4, "new": 2, "diff": -2}
        status = json.loads(dvc(root, "status", "--json").stdout)
        # every stage that evaluates reads the evaluation params
        assert set(status) == {"baselines", "evaluate", "learning_curve", "effects"}
        set_params(root / "params.yaml", {"evaluation.batch_size": 4, "export.opset": 19})
        # export's params changed; evaluate reruns after it only if export's outputs change
        assert set(json.loads(dvc(root, "status", "--json").stdout)) == {"export"}
    finally:
        (root / "params.yaml").write_text(original)
    assert dvc(root, "metrics", "diff", "HEAD", "--json").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_corrupt_training_data_stops_at_validate_and_keeps_earlier_outputs(project):
    root, _ = project
    kept = {p: digest(root / p) for p in ("derived/train_scored.jsonl", "models/self_distill",
                                          "models/compensation", "models/onnx", "metrics/per_layer.json")}
    rows = [*TRAIN_ROWS,
            {"query": "capital of Italy", "pos": ["Rome is the capital of Italy."], "neg": []},
            {"query": "leaky", "pos": ["Paris is the capital of France."], "neg": ["Paris is the capital of France."]}]
    write_jsonl(root / "data" / "own.jsonl", rows)
    original = (root / "params.yaml").read_text()
    try:
        set_params(root / "params.yaml", {"data.train_file": "data/own.jsonl"})
        failed = dvc(root, "repro", check=False)
    finally:
        (root / "params.yaml").write_text(original)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "Running stage 'validate'" in output and "Running stage 'teacher_score'" not in output
    assert "neg_not_empty" in output and "positive_not_in_negatives" in output
    summary = json.loads((root / "reports/validation/summary.json").read_text())
    failing = {c["name"]: c for c in summary["checks"] if not c["success"]}
    assert set(failing) == {"neg_not_empty", "positive_not_in_negatives"}
    assert failing["neg_not_empty"]["sample_lines"] == [4] and failing["positive_not_in_negatives"]["sample_lines"] == [5]
    assert (root / "reports/validation/index.html").exists()
    assert {p: digest(root / p) for p in kept} == kept


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_experiment_stops_when_the_params_set_is_refused(tmp_path):
    """`make experiment EXP=<typo>` (or a checkout path experiment-args refuses) must fail, not run
    `dvc exp run` with no `-S` at all: the default params.yaml under the experiment's name."""
    import subprocess

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "dvc-calls"
    (venv / "bin" / "dvc").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    (venv / "bin" / "matryoshka").write_text('#!/bin/sh\necho "error: no params set" >&2\nexit 2\n')
    for tool in ("dvc", "matryoshka"):
        (venv / "bin" / tool).chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: `setup` has nothing to do
    done = subprocess.run(["make", "-s", "-C", str(REPO), "experiment", f"VENV={venv}", "EXP=no-such-set"],
                          capture_output=True, text=True)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "no params set" in done.stderr
    assert not calls.exists(), calls.read_text()
