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
from typer.core import TyperCommand

for _var, _value in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

# PyTorch's OpenMP threads otherwise spin at every barrier: on a shared 2-core machine that made a
# 2-thread SmolLM2 forward 6x slower (docs/export.md). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    _setup_logging(verbose)


class _ListOptionsCommand(TyperCommand):
    """Lets a list option take several values after one flag (``--layers 8 16 30``), as argparse's
    ``nargs="+"`` does; repeating the flag (``--layers 8 --layers 16``) works too."""

    def parse_args(self, ctx, args):
        lists = {name for p in self.params if p.param_type_name == "option" and p.multiple for name in p.opts}
        expanded, flag = [], None
        for arg in args:
            if arg.startswith("-"):
                flag = arg if arg in lists else None
            elif flag is not None and expanded[-1] != flag:
                expanded.append(flag)
            expanded.append(arg)
        return super().parse_args(ctx, expanded)


@app.command(cls=_ListOptionsCommand)
def export(
    params: Annotated[Optional[Path], typer.Option("--params", "-p", help="params.yaml (the pipeline form; "
                                                   "the default when --model is not given)")] = None,
    overrides: SetOpt = None,
    model: Annotated[Optional[str], typer.Option(help="explicit form: model folder or embedded:...")] = None,
    peft_path: Annotated[Optional[list[Path]], typer.Option(help="adapter folder(s), merged in order")] = None,
    layers: Annotated[Optional[list[int]], typer.Option(help="exit layers, e.g. --layers 8 16 30")] = None,
    ratios: Annotated[Optional[list[int]], typer.Option(help="compression ratios (default 1)")] = None,
    compress_layers: Annotated[Optional[list[int]], typer.Option(help="compression layers (ratios > 1)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (replaced atomically)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, or float16 for GPU serving")] = "float32",
    dynamo: Annotated[bool, typer.Option(help="--no-dynamo: TorchScript exporter (fallback)")] = True,
    attn_implementation: Annotated[str, typer.Option(help="eager or sdpa attention in the graph")] = "eager",
    start_layer: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 4)")] = None,
    layer_sep: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 1)")] = None,
    max_length: int = 512,
    query_max_len: Optional[int] = None,
    passage_max_len: Optional[int] = None,
) -> None:
    """Export ONNX models, one folder per (exit layer, ratio), plus index.json.

    Explicit form: --model DIR [--peft-path A B] --layers 8 16 30 [--ratios 1 2 4] [--compress-layers 8]
    --out DIR. Pipeline form: --params params.yaml [-S export.exit_layers=[8,16]] (adapters from
    params.adapter_stack(ratio), output in paths.onnx).
    """
    from .export import ExportError, ExportOptions, TokenizationSettings, export_from_params, export_models

    try:
        if model is None:
            explicit = {"--peft-path": peft_path, "--layers": layers, "--ratios": ratios,
                        "--compress-layers": compress_layers, "--out": out}
            given = [name for name, value in explicit.items() if value]
            if given:
                raise ValueError(f"{', '.join(given)} need --model (with --params, use -S export.<key>=...)")
            loaded = _params(params or Path("params.yaml"), overrides)
            index, out = export_from_params(loaded), Path(loaded.paths.onnx)
        else:
            if params is not None or overrides:
                raise ValueError("--model (explicit form) cannot be combined with --params/-S")
            if not layers or out is None:
                raise ValueError("the explicit form needs --layers and --out")
            tokenization = TokenizationSettings(max_length=max_length, query_max_len=query_max_len,
                                                passage_max_len=passage_max_len)
            options = ExportOptions(dtype=dtype, dynamo=dynamo, attn_implementation=attn_implementation,
                                    start_layer=start_layer, layer_sep=layer_sep, tokenization=tokenization)
            index = export_models(model, out, layers, ratios or [1], compress_layers or [],
                                  adapters=lambda ratio: peft_path or [], options=options)
    except (ValueError, FileNotFoundError, ExportError) as err:
        _fail(err, 2 if not isinstance(err, ExportError) else 1)
    for entry in index["models"]:
        typer.echo(f"{entry['name']}\t{out / entry['path']}")


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
