"""The ``matryoshka`` command: one entry point, one thin subcommand per stage.

Every pipeline stage reads ``--params params.yaml`` with ``-S dotted.key=value`` overrides, so a
DVC stage is a one-line call. Heavy imports happen inside the commands, not at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

for _var, _value in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, export and release Matryoshka re-rankers.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override: dotted.key=value (YAML value)")]
IntList = Annotated[Optional[list[int]], typer.Option()]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _params(path: Path, overrides: list[str] | None):
    from .config import ParamsError, load_params

    try:
        return load_params(path, overrides or [])
    except ParamsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _fail(err: Exception, code: int = 1):
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code) from None


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    local_rank: Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True,
                                                      help="set by the deepspeed launcher (also in $LOCAL_RANK)")] = None,
) -> None:
    _setup_logging(verbose)


@app.command()
def score(
    model: Annotated[str, typer.Option(help="model folder or embedded:smollm2-135m-instruct")],
    pairs: Annotated[Path, typer.Option(help='JSONL of {"query": ..., "passage": ...}')],
    peft_path: Annotated[Optional[list[Path]], typer.Option(help="adapter folder(s), merged in order")] = None,
    cutoff_layers: IntList = None,
    compress_layers: IntList = None,
    compress_ratio: int = 1,
    start_layer: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 4)")] = None,
    layer_sep: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 1)")] = None,
    batch_size: int = 32,
    max_length: int = 512,
    normalize: bool = False,
) -> None:
    """Score query-passage pairs; prints one JSON line per pair ({"layer": score, ...})."""
    from .reranker import MatryoshkaReranker

    try:
        rows = _read_pairs(pairs)
        reranker = MatryoshkaReranker(model, peft_path=peft_path, start_layer=start_layer, layer_sep=layer_sep,
                                      batch_size=batch_size, max_length=max_length)
        layers = cutoff_layers or [reranker.exit_layers[-1]]
        scores = reranker.compute_score(rows, cutoff_layers=layers, compress_layers=compress_layers,
                                        compress_ratio=compress_ratio, normalize=normalize)
    except (ValueError, TypeError, FileNotFoundError) as err:
        _fail(err, 2)
    per_layer = [scores] if len(layers) == 1 else scores
    for i in range(len(rows)):
        typer.echo(json.dumps({str(k): per_layer[j][i] for j, k in enumerate(layers)}))


# ------------------------------------------------------------------ training stages (issue 3)
@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """BEIR data -> training groups (BM25 negatives) and eval candidates (BM25 top-k)."""
    p = _params(params, set_)
    from .prepare import prepare as run

    try:
        summary = run(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"{summary.train_groups} training groups ({summary.source}) -> {p.paths.train_groups}; "
               f"{summary.eval_queries} eval queries -> {p.paths.eval_candidates}")


@app.command("teacher-score")
def teacher_score(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fill pos_scores/neg_scores of the training groups with the configured teacher (resumable)."""
    p = _params(params, set_)
    from .teacher import score_training_file

    try:
        out = score_training_file(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"teacher scores -> {out}")


@app.command("self-distill")
def self_distill(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Cascaded self-distillation: LoRA (+ score heads) -> paths.self_distill. Resumes from checkpoints."""
    p = _params(params, set_)
    from .training import self_distill as run

    try:
        summary = run(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"self-distillation: {summary['steps']} steps in {summary['wall_seconds']} s -> {p.paths.self_distill}")


@app.command()
def compensate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    only: Annotated[Optional[list[str]], typer.Option(help="train only these: layer, token-ratio-<r>")] = None,
) -> None:
    """Factorized compensation: layer adapter + one token adapter per ratio -> paths.compensation."""
    p = _params(params, set_)
    from .compensation import compensate as run

    try:
        results = run(p, only=only)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    for name, summary in results.items():
        typer.echo(f"compensation {name}: {summary['steps']} steps in {summary['wall_seconds']} s")


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((obj["query"], obj["passage"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: expected {{\"query\": str, \"passage\": str}} ({err})") from None
    return rows


if __name__ == "__main__":
    app()
