"""dvc.yaml's code dependencies cover every module each stage can import.

Otherwise ``dvc status`` says "up to date" after a code change that alters a stage's outputs, and
``publish`` trusts it. The check is static and conservative: starting from the CLI command a stage
runs, it follows every relative import of the package, including imports inside functions (the
CLI imports lazily), and requires each module's file to lie under one of the stage's deps.
``cli.py`` and the package ``__init__.py`` are exempt: they only parse arguments and re-export
names, and depending on them would rerun every stage whenever a command's help text or the
version string changed (what they import at import time is still followed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "matryoshka_reranker"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def module_file(dotted: str) -> Path:
    parts = dotted.split(".")[1:]  # drop "matryoshka_reranker"
    base = PACKAGE.joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names of the package modules imported anywhere under ``node``."""
    found = set()
    package = module if is_package else module.rsplit(".", 1)[0]
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom) and item.level:
            base = package.split(".")
            base = base[: len(base) - (item.level - 1)]
            target = ".".join(base + ([item.module] if item.module else []))
            for alias in item.names:  # `from . import x` / `from .pkg import mod` may name modules
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_file(candidate).exists() else target)
        elif isinstance(item, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in item.names] if isinstance(item, ast.Import) else [item.module or ""]
            found |= {n for n in names if n.startswith("matryoshka_reranker.")}
    return {m for m in found if module_file(m).exists()}


# Imports no stage executes, each with its reason (everything else is followed).
NOT_RUN_BY_STAGES = {
    ("matryoshka_reranker.serving.onnx_runtime", "matryoshka_reranker.release.registry"):
        "OnnxReranker.from_release: a user convenience that downloads a release; no stage calls it",
}


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(module)
        tree = ast.parse(path.read_text())
        if module == "matryoshka_reranker":  # its __getattr__ re-exports lazily: only import-time imports count
            tree = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)], type_ignores=[])
        todo += [m for m in imports_of(tree, module, path.name == "__init__.py")
                 if (module, m) not in NOT_RUN_BY_STAGES]
        parent = module.rsplit(".", 1)[0]
        if parent != module and module_file(parent).exists():
            todo.append(parent)  # importing a.b.c runs a/__init__ and a/b/__init__
    return seen


def command_imports(command: str) -> set[str]:
    """Package modules the CLI function behind ``matryoshka <command>`` imports."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                call = decorator if isinstance(decorator, ast.Call) else None
                name = node.name.replace("_", "-")
                if call and call.args and isinstance(call.args[0], ast.Constant):
                    name = call.args[0].value
                if name == command or node.name == command.replace("-", "_"):
                    return imports_of(node, "matryoshka_reranker.cli", False)
    raise AssertionError(f"no CLI command {command!r}")


STAGES = {name: stage for name, stage in DVC["stages"].items()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_every_module_it_imports(name):
    stage = STAGES[name]
    command = stage["cmd"].split()[1]
    modules = closure(command_imports(command) | {"matryoshka_reranker"}) - {"matryoshka_reranker.cli",
                                                                             "matryoshka_reranker"}
    deps = [ROOT / d for d in stage.get("deps", []) if not str(d).startswith("${")]
    uncovered = sorted(str(module_file(m).relative_to(ROOT)) for m in modules
                       if not any(module_file(m) == d or d in module_file(m).parents for d in deps))
    assert not uncovered, f"stage {name}: add to deps in dvc.yaml: {uncovered}"


def test_every_stage_is_one_cli_call():
    for name, stage in STAGES.items():
        assert stage["cmd"].startswith("matryoshka ") and "&&" not in stage["cmd"] and ";" not in stage["cmd"], name
