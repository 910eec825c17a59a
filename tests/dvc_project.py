"""A throwaway git + DVC project whose cheap stages stand in for the real pipeline in release tests.

``prepare -> export -> evaluate`` (listed out of order in dvc.yaml, to test the ordering) write fake
per-ratio model folders (format 3) with real ``manifest.json`` sha256s and a ``metrics/per_layer.json`` in the
shared format. ``knobs.yaml`` steers them: ``quality`` (base nDCG@10), ``delta`` (per-config shift),
``drop`` (configs left out of the metrics), ``model_seed`` (changes the model bytes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from matryoshka_reranker.config import Params, parse_params
from matryoshka_reranker.release.registry import sync_artifacts

# DVC keeps remote indexes in a site cache (default /var/tmp/dvc): keep the tests' own apart
os.environ.setdefault("DVC_SITE_CACHE_DIR", tempfile.mkdtemp(prefix="dvc-site-"))

FAKE_PIPELINE = '''\
import hashlib, json, random, sys
from pathlib import Path
import yaml

params = yaml.safe_load(open("params.yaml"))
knobs = yaml.safe_load(open("knobs.yaml"))
exits, ratios = params["export"]["exit_layers"], params["export"]["ratios"]
onnx, metrics = Path(params["paths"]["onnx"]), Path(params["paths"]["metrics"])
per_query_path = Path(params["paths"]["per_query"])
names = [(k, r, f"exit-{k:02d}-ratio-{r}") for k in exits for r in ratios]
specialists = [(k, 1, f"exit-{k:02d}-ratio-1-specialist") for k in params.get("specialist", {}).get("exits", [])]
QUERIES = [f"q{i}" for i in range(40)]
IDENTITY = {"split": "test", "queries": len(QUERIES), "query_ids_sha256": "ids" + str(knobs.get("eval_set", 1)),
            "candidates_per_query": 5, "candidates_sha256": "c", "qrels_sha256": "q"}
stage = sys.argv[1]
if stage == "prepare":
    Path("derived").mkdir(exist_ok=True)
    Path("derived/data.txt").write_text(f"data {knobs['data_version']}\\n")
elif stage == "export":
    data = Path("derived/data.txt").read_text()
    for r in ratios:
        folder = onnx / f"ratio-{r}"
        folder.mkdir(parents=True, exist_ok=True)
        files = {"weights.bin": f"weights {r} {data} {knobs['model_seed']}\\n".encode() * 64,
                 "tokenizer.json": b'{"model": "bpe"}'}
        files.update({f"exit-{k:02d}.onnx": f"graph {k} {r}\\n".encode() for k in exits})
        for rel, blob in files.items():
            (folder / rel).write_bytes(blob)
        models = [{"name": f"exit-{k:02d}-ratio-{r}", "kind": "exit", "exit_layer": k, "model_file": f"exit-{k:02d}.onnx",
                   "applied_layers": []} for k in exits]
        manifest = {"format_version": 3, "name": folder.name, "compression": {"layers": [2], "ratio": r},
                    "models": models, "files": {rel: hashlib.sha256(blob).hexdigest() for rel, blob in files.items()}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for k, _, name in specialists:  # an exit specialist: a folder of its own, like the real export's
        folder = onnx / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {"weights.bin": f"specialist {k} {data} {knobs['model_seed']}\\n".encode() * 16,
                 f"exit-{k:02d}.onnx": f"graph {k} specialist\\n".encode()}
        for rel, blob in files.items():
            (folder / rel).write_bytes(blob)
        manifest = {"format_version": 3, "name": name, "variant": "specialist", "compression": {"layers": [], "ratio": 1},
                    "models": [{"name": name, "kind": "exit", "exit_layer": k, "model_file": f"exit-{k:02d}.onnx",
                                "applied_layers": []}],
                    "files": {rel: hashlib.sha256(blob).hexdigest() for rel, blob in files.items()}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    index = {"format_version": 3, "models": [{"name": n, "exit_layer": k, "ratio": r, "path": f"ratio-{r}",
                                              "model_file": f"exit-{k:02d}.onnx"} for k, r, n in names]
                                            + [{"name": n, "exit_layer": k, "ratio": 1, "path": n, "variant": "specialist",
                                                "model_file": f"exit-{k:02d}.onnx"} for k, _, n in specialists]}
    (onnx / "index.json").write_text(json.dumps(index))
elif stage == "evaluate":
    configs, systems = {}, {}
    for k, r, name in names + specialists:
        if name in (knobs.get("drop") or []):
            continue
        shift = (knobs.get("delta") or {}).get(name, 0.0)
        rng = random.Random(f"{name}/{knobs.get('noise_seed', 0)}")
        base = knobs["quality"] + 0.01 * k - 0.02 * (r - 1)
        values = {q: min(1.0, max(0.0, base + shift + rng.gauss(0, knobs.get("noise", 0.0)))) for q in QUERIES}
        mean = sum(values.values()) / len(values)
        systems[name] = {"nDCG@10": values, "RR@10": {q: v - 0.03 for q, v in values.items()},
                         "R@10": {q: min(1.0, v + 0.05) for q, v in values.items()}}
        configs[name] = {"exit_layer": k, "ratio": r, "nDCG@10": mean, "RR@10": mean - 0.03,
                         "R@10": sum(systems[name]["R@10"].values()) / len(QUERIES), "latency_ms_per_query": 0.5 * k / r}
        if name.endswith("-specialist"):  # what the real evaluation adds to a variant
            configs[name].update(variant="specialist", of=name.removesuffix("-specialist"),
                                 spearman_vs_float=0.9 - 0.1 * knobs["model_seed"])
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"format_version": 2, "eval": {"queries": len(QUERIES), "candidates": 5,
                                                                 "identity": IDENTITY},
                                   "baselines": {"bm25": {"nDCG@10": 0.5, "RR@10": 0.4, "R@10": 0.6}},
                                   "configs": configs, "pytorch_check": {"enabled": True, "passed": True}}, indent=2))
    per_query_path.write_text(json.dumps({"format_version": 2, "identity": IDENTITY, "systems": systems}))
'''

DVC_YAML = '''\
# fake pipeline for release tests
stages:
  evaluate:  # listed first on purpose: the flow must order stages by their dependencies
    cmd: python fake_pipeline.py evaluate
    deps: [fake_pipeline.py, models/onnx]
    params:
      - knobs.yaml:
          - quality
          - delta
          - drop
          - noise
          - noise_seed
          - eval_set
    metrics:
      - metrics/per_layer.json:
          cache: false
    outs:
      - metrics/per_query.json:
          cache: false
  prepare:
    cmd: python fake_pipeline.py prepare
    deps: [fake_pipeline.py]
    params:
      - knobs.yaml:
          - data_version
    outs: [derived/data.txt]
  export:
    cmd: python fake_pipeline.py export
    deps: [fake_pipeline.py, derived/data.txt]
    params:
      - export.exit_layers
      - export.ratios
      - specialist.exits
      - knobs.yaml:
          - model_seed
    outs: [models/onnx]
'''

KNOBS = {"quality": 0.5, "delta": {}, "drop": [], "model_seed": 0, "data_version": 1, "noise": 0.0, "noise_seed": 0,
         "eval_set": 1}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    from matryoshka_reranker.pipeline.repro import tool_env

    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=tool_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], root, check=check)


def git(root: Path, *args: str) -> str:
    return run(["git", *args], root).stdout.strip()


def make_params(remote: Path, git_remote: str | None = None, scheme: str = "semver",
                remote_name: str = "releases", specialists: list[int] = ()) -> Params:
    raw = Params().model_dump()
    raw["export"].update(exit_layers=[4, 6], ratios=[1, 2])
    raw["specialist"]["exits"] = list(specialists)
    raw["release"].update(remote_url=str(remote), version_scheme=scheme, git_remote=git_remote, remote_name=remote_name)
    return parse_params(raw)


def set_knobs(root: Path, **changes) -> None:
    knobs = yaml.safe_load((root / "knobs.yaml").read_text())
    knobs.update(changes)
    (root / "knobs.yaml").write_text(yaml.safe_dump(knobs))


def make_project(base: Path, git_remote: bool = True, scheme: str = "semver",
                 per_config_outs: bool = False, remote_name: str = "releases",
                 specialists: list[int] = ()) -> tuple[Path, Params]:
    """``base/project`` (committed, not yet reproduced), ``base/origin.git`` (bare), remote at ``base/dvc-remote``.

    ``per_config_outs``: the export stage declares one DVC output per ratio folder instead of
    one output for the whole ``models/onnx``.
    """
    root = base / "project"
    root.mkdir(parents=True)
    params = make_params(base / "dvc-remote", "origin" if git_remote else None, scheme, remote_name, specialists)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    (root / "knobs.yaml").write_text(yaml.safe_dump(KNOBS))
    (root / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    dvc_yaml = DVC_YAML
    if per_config_outs:
        folders = [f"models/onnx/ratio-{r}" for r in params.export.ratios]
        dvc_yaml = dvc_yaml.replace("    outs: [models/onnx]\n",
                                    f"    outs: [{', '.join(folders)}, models/onnx/index.json]\n")
        dvc_yaml = dvc_yaml.replace("deps: [fake_pipeline.py, models/onnx]",
                                    f"deps: [fake_pipeline.py, {', '.join(folders)}]")
    (root / "dvc.yaml").write_text(dvc_yaml)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "release-test@example.com")
    git(root, "config", "user.name", "release test")
    git(root, "config", "commit.gpgsign", "false")
    git(root, "config", "tag.gpgsign", "false")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "false")
    sync_artifacts(params, root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "fake pipeline")
    if git_remote:
        run(["git", "init", "-q", "--bare", "-b", "main", str(base / "origin.git")], base)
        git(root, "remote", "add", "origin", str(base / "origin.git"))
        git(root, "push", "-q", "origin", "main")
    return root, params


def repro(root: Path) -> None:
    dvc(root, "repro", "-q")
