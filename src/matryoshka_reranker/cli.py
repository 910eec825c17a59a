"""The ``matryoshka`` command: one entry point, one thin subcommand per stage.

Every pipeline stage reads ``--params params.yaml`` with ``-S dotted.key=value`` overrides, so a
DVC stage is a one-line call. Heavy imports happen inside the commands, not at start-up.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .core.environment import configure

configure()  # offline, no telemetry, sleeping OpenMP threads: before torch/prefect/GX load



class _ExitCodesByMeaning(TyperGroup):
    """Every command's errors become a one-line message and an exit code by meaning:
    2 = bad input or configuration (``InputError``, a missing file, a bad value), 1 = a check
    failed or an operation was refused (``CheckFailed``, other ``MatryoshkaError``). Anything else
    is a bug and keeps its traceback."""

    def invoke(self, ctx):
        from .core.errors import MatryoshkaError

        try:
            return super().invoke(ctx)
        except MatryoshkaError as err:
            _fail(err, err.exit_code)
        except (FileNotFoundError, ValueError, TypeError) as err:
            _fail(err, 2)


app = typer.Typer(cls=_ExitCodesByMeaning, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    ratios: Annotated[Optional[list[int]], typer.Option(help="compression ratios (default: a token adapter's "
                                                            "trained ratio, else 1)")] = None,
    compress_layers: Annotated[Optional[list[int]], typer.Option(help="compression layers (ratios > 1; default: "
                                                                     "the token adapter's)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (replaced atomically)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, or float16 for GPU serving")] = "float32",
    dynamo: Annotated[bool, typer.Option(help="--no-dynamo: TorchScript exporter (fallback)")] = True,
    attn_implementation: Annotated[str, typer.Option(help="eager or sdpa attention in the graph")] = "eager",
    start_layer: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 4)")] = None,
    layer_sep: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 1)")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="input format of a raw checkpoint (adapters carry theirs)")] = None,
    query_max_len: Annotated[Optional[int], typer.Option(help="input format of a raw checkpoint")] = None,
    passage_max_len: Annotated[Optional[int], typer.Option(help="input format of a raw checkpoint")] = None,
) -> None:
    """Export ONNX models: one folder per ratio (a graph per exit beside one weights file), plus index.json.

    Explicit form: --model DIR [--peft-path A B] --layers 8 16 30 [--ratios 1 2 4] [--compress-layers 8]
    --out DIR. Pipeline form: --params params.yaml [-S export.exit_layers=[8,16]] (adapters from
    params.adapter_stack(ratio), output in paths.onnx).
    """
    from .pipeline.export import (
        ExportError,
        ExportOptions,
        export_from_params,
        export_models,
    )

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
            options = ExportOptions(dtype=dtype, dynamo=dynamo, attn_implementation=attn_implementation,
                                    start_layer=start_layer, layer_sep=layer_sep,
                                    input_format=_input_format(prompt, query_max_len, passage_max_len))
            ratios, compress_layers = _trained_width(peft_path, ratios, compress_layers)
            index = export_models(model, out, layers, ratios, compress_layers,
                                  adapters=lambda ratio: peft_path or [], options=options)
    except (ValueError, FileNotFoundError, ExportError) as err:
        _fail(err, 2 if not isinstance(err, ExportError) else 1)
    for entry in index["models"]:
        typer.echo(f"{entry['name']}\t{out / entry['path'] / entry['model_file']}")


def _input_format(prompt, query_max_len, passage_max_len):
    """An explicit input format from CLI options (None when none is given: the model's own is used)."""
    from .model.inputs import InputFormat

    if prompt is None and query_max_len is None and passage_max_len is None:
        return None
    default = InputFormat()
    return InputFormat(prompt or default.prompt, query_max_len or default.query_max_len,
                       passage_max_len or default.passage_max_len)


def _trained_width(peft_path, ratios, compress_layers) -> tuple[list[int], list[int]]:
    """The explicit export's ratios and compression layers: as given, else the width the top token adapter of
    ``peft_path`` was trained at (its training log), as ``MatryoshkaReranker`` and ``score`` take it, else ratio 1."""
    if not ratios and peft_path:
        from .model.adapters import stack_compression

        trained = stack_compression(peft_path)
        if trained:
            return [trained[1]], list(compress_layers or trained[0])
    return list(ratios or [1]), list(compress_layers or [])


def _load_reranker(model: str, peft_path, start_layer, layer_sep, batch_size, input_format, compress_layers=(),
                   compress_ratio=None, exit_layer=None, dtype="auto"):
    """An exported ONNX folder (has manifest.json) -> OnnxReranker at ``exit_layer`` (None: the folder's
    deepest); anything else -> MatryoshkaReranker. ``compress_ratio`` None means "not given": the folder's
    own ratio for ONNX, for PyTorch the width a token adapter in ``peft_path`` was trained at, else 1; any other
    ratio than an ONNX folder's is refused, 1 included."""
    from .serving.artifacts import MANIFEST  # torch- and onnx-free

    if (Path(model) / MANIFEST).is_file():
        from .serving.onnx_runtime import OnnxReranker

        if peft_path or start_layer or layer_sep or input_format or dtype != "auto":
            raise ValueError(f"{model} is an exported ONNX model: adapters, layers, input format and dtype are fixed in it")
        reranker = OnnxReranker(model, exit_layer, batch_size=batch_size)
        layers = tuple(reranker.manifest["compression"]["layers"])
        if compress_ratio not in (None, reranker.compress_ratio) or (compress_layers and tuple(compress_layers) != layers):
            raise ValueError(f"{model} is exported at compression ratio {reranker.compress_ratio} (layers {list(layers)}): "
                             "width is fixed in an ONNX folder; use the export's ratio-<r> folder for another ratio")
        return reranker
    from .serving.reranker import MatryoshkaReranker

    return MatryoshkaReranker(model, peft_path=peft_path, start_layer=start_layer, layer_sep=layer_sep,
                              batch_size=batch_size, input_format=input_format, compress_layers=compress_layers or None,
                              compress_ratio=compress_ratio, dtype=dtype)  # None: the token adapter's width, else 1


ModelOpt = Annotated[str, typer.Option(help="model folder, embedded:smollm2-135m-instruct, or an exported ONNX folder")]
PeftOpt = Annotated[Optional[list[Path]], typer.Option(help="adapter folder(s), merged in order (PyTorch models)")]
RatioOpt = Annotated[Optional[int], typer.Option(help="compression ratio (PyTorch models; default 1); an ONNX folder "
                                                  "has its own, and another one is refused")]
DtypeOpt = Annotated[str, typer.Option(help="PyTorch models: auto (bf16 on a GPU or an AMX-BF16 CPU, else fp32), "
                                            "float32 or bfloat16")]


@app.command(cls=_ListOptionsCommand)
def score(
    model: ModelOpt,
    pairs: Annotated[Path, typer.Option(help='JSONL of {"query": ..., "passage": ...}')],
    peft_path: PeftOpt = None,
    cutoff_layers: IntList = None,
    compress_layers: IntList = None,
    compress_ratio: RatioOpt = None,
    start_layer: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 4)")] = None,
    layer_sep: Annotated[Optional[int], typer.Option(help="raw checkpoints only (default 1)")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="input format of a raw checkpoint (adapters carry theirs)")] = None,
    query_max_len: Annotated[Optional[int], typer.Option(help="input format of a raw checkpoint")] = None,
    passage_max_len: Annotated[Optional[int], typer.Option(help="input format of a raw checkpoint")] = None,
    batch_size: int = 32,
    normalize: bool = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Score query-passage pairs; prints one JSON line per pair ({"layer": score, ...})."""
    try:
        rows = _read_pairs(pairs)
        fmt = _input_format(prompt, query_max_len, passage_max_len)
        reranker = _load_reranker(model, peft_path, start_layer, layer_sep, batch_size, fmt, compress_layers,
                                  compress_ratio, exit_layer=(cutoff_layers or [None])[-1], dtype=dtype)
        if hasattr(reranker, "exit_layer"):  # ONNX: one graph per exit in the folder
            layers = cutoff_layers or [reranker.exit_layer]
            per_layer = [(reranker if k == reranker.exit_layer else
                          _load_reranker(model, None, None, None, batch_size, None, exit_layer=k)
                          ).compute_score(rows, normalize=normalize) for k in layers]
        else:
            layers = cutoff_layers or [reranker.exit_layers[-1]]
            scores = reranker.compute_score(rows, cutoff_layers=layers, compress_layers=compress_layers,
                                            compress_ratio=compress_ratio, normalize=normalize)  # None: the reranker's own
            per_layer = [scores] if len(layers) == 1 else scores
    except (ValueError, TypeError, FileNotFoundError) as err:
        _fail(err, 2)
    for i in range(len(rows)):
        typer.echo(json.dumps({str(k): per_layer[j][i] for j, k in enumerate(layers)}))


@app.command(cls=_ListOptionsCommand)
def rank(
    model: ModelOpt,
    query: Annotated[str, typer.Option(help="the query")],
    documents: Annotated[Path, typer.Option(help="one document per line (text), or JSONL with a \"text\" field")],
    top_k: Annotated[Optional[int], typer.Option(help="keep the best k")] = None,
    peft_path: PeftOpt = None,
    cutoff_layer: Annotated[Optional[int], typer.Option(help="exit layer (default the deepest)")] = None,
    compress_layers: IntList = None,
    compress_ratio: RatioOpt = None,
    batch_size: int = 32,
    return_documents: Annotated[bool, typer.Option(help="include each document's text")] = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Rank documents for one query, best first; prints [{"corpus_id", "score"(, "text")}] as JSON."""
    try:
        docs = _read_documents(documents)
        reranker = _load_reranker(model, peft_path, None, None, batch_size, None, compress_layers, compress_ratio,
                                  exit_layer=cutoff_layer, dtype=dtype)
        options = {} if hasattr(reranker, "exit_layer") else {"cutoff_layer": cutoff_layer}
        ranked = reranker.rank(query, docs, top_k=top_k, return_documents=return_documents, **options)
    except (ValueError, TypeError, OSError) as err:  # OSError: a missing, unreadable or folder path
        _fail(err, 2)
    typer.echo(json.dumps(ranked, ensure_ascii=False, indent=1))


def _read_documents(path: Path) -> list[str]:
    """Plain text, one document per line; or JSONL with a "text" field, recognised by its suffix (.jsonl,
    .json) or by lines that all start with "{" (a .jsonl line that does not parse is an error, not text)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--documents takes a text or JSONL file)")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and (path.suffix in (".jsonl", ".json") or all(line.lstrip().startswith("{") for line in lines)):
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}, document line {number}: JSONL documents need a \"text\" field ({err})") from None
            if not isinstance(texts[-1], str):
                raise ValueError(f"{path}, document line {number}: \"text\" must be a string")
        return texts
    return lines


# ------------------------------------------------------------------ training stages (issue 3)
@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """BEIR data -> training groups (BM25 negatives) and eval candidates (BM25 top-k)."""
    p = _params(params, set_)
    from .pipeline.prepare import prepare as run

    try:
        summary = run(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"{summary.train_groups} training groups ({summary.source}) -> {p.paths.train_groups}; "
               f"{summary.eval_queries} eval queries -> {p.paths.eval_candidates}")


@app.command("teacher-score")
def teacher_score(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fill pos_scores/neg_scores of the training groups with the configured teacher (resumable).

    With distributed.processes > 1 every worker scores its share of the shards and worker 0 merges."""
    p = _params(params, set_)
    _maybe_relaunch(p, ["teacher-score", "-p", str(params), *_set_args(set_)])
    from .training.teacher import score_training_file

    try:
        out = score_training_file(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"teacher scores -> {out}")


@app.command("self-distill")
def self_distill(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Cascaded self-distillation: LoRA (+ score heads) -> paths.self_distill. Resumes from checkpoints."""
    p = _params(params, set_)
    _maybe_relaunch(p, ["self-distill", "-p", str(params), *_set_args(set_)])
    from .training.trainer import self_distill as run

    try:
        summary = run(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"self-distillation: {summary['steps']} steps in {summary['wall_seconds']} s -> {p.paths.self_distill}")


def _set_args(overrides: list[str] | None) -> list[str]:
    return [arg for item in overrides or [] for arg in ("-S", item)]


def _maybe_relaunch(p, cli_args: list[str]) -> None:
    """With ``distributed.processes`` > 1, re-run this command as that many workers and exit."""
    from .training.trainer import relaunch_distributed, worker_processes

    code = relaunch_distributed(worker_processes(p.distributed.processes), cli_args)
    if code is not None:
        raise typer.Exit(code)


@app.command()
def compensate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    only: Annotated[Optional[list[str]], typer.Option(help="train only these: layer, token-ratio-<r>")] = None,
) -> None:
    """Factorized compensation: layer adapter + one token adapter per ratio -> paths.compensation."""
    p = _params(params, set_)
    _maybe_relaunch(p, ["compensate", "-p", str(params), *_set_args(set_), *[a for o in only or [] for a in ("--only", o)]])
    from .training.compensation import compensate as run

    try:
        results = run(p, only=only)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    for name, summary in results.items():
        typer.echo(f"compensation {name}: {summary['steps']} steps in {summary['wall_seconds']} s")


@app.command()
def specialize(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Exit specialists: the ratio-1 model cut after each specialist.exits layer, trained for that exit
    alone on its deepest exit's scores -> paths.specialists (empty when specialist.exits is)."""
    p = _params(params, set_)
    if p.specialist.exits:
        _maybe_relaunch(p, ["specialize", "-p", str(params), *_set_args(set_)])
    from .training.specialist import specialize as run

    try:
        results = run(p)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    for k, summary in results.items():
        typer.echo(f"specialist exit {k}: {summary['steps']} steps in {summary['wall_seconds']} s "
                   f"(cut changed exit {k} by {summary['cut_max_abs_diff']:.1e})")
    if not results:
        typer.echo(f"specialist.exits is empty: {p.paths.specialists} holds no specialist")


# ------------------------------------------------------------ validation and evaluation (issue 5)
@app.command()
def validate(
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    input: Annotated[Optional[Path], typer.Option("--input", help="training JSONL (default: paths.train_groups)")] = None,
    report: Annotated[Optional[Path], typer.Option(help="report folder (default: paths.validation_report)")] = None,
    require_scores: Annotated[bool, typer.Option(help="teacher scores must be present (after teacher_score)")] = False,
) -> None:
    """Great Expectations suite over training data; exits 1 with a report when the data fail."""
    cfg = _params(params, overrides)
    from .pipeline.validation import format_failures, validate_training_data

    path = input or Path(cfg.paths.train_groups)
    folder = report or Path(cfg.paths.validation_report)
    try:
        result = validate_training_data(path, folder, cfg.validation, require_scores=require_scores,
                                        prompt=cfg.model.prompt)
    except FileNotFoundError as err:
        _fail(err, 2)
    if not result.success:
        typer.echo(format_failures(result), err=True)
        raise typer.Exit(1)
    typer.echo(f"validation passed: {result.rows} lines of {path}, {len(result.checks)} checks; report in {folder}")


@app.command()
def baselines(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """The untrained model on the eval set (when evaluation.untrained_baseline) -> paths.baselines."""
    cfg = _params(params, overrides)
    from .pipeline.evaluation import untrained_baseline

    try:
        result = untrained_baseline(cfg)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    typer.echo(f"baselines ({len(result['per_query'])} untrained exits) -> {cfg.paths.baselines}")


@app.command("learning-curve")
def learning_curve_command(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Quality of every self-distillation snapshot (self_distill.snapshot_steps) -> paths.learning_curve."""
    cfg = _params(params, overrides)
    from .pipeline.evaluation import learning_curve

    try:
        curve = learning_curve(cfg)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    measure = cfg.evaluation.measures[0]
    for point in curve["points"]:
        typer.echo(f"step {point['step']:>6}  exit {point['exit_layer']:>3}  {measure} {point[measure]:.4f} "
                   f"[{point[measure + '_ci'][0]:.4f}, {point[measure + '_ci'][1]:.4f}]")


@app.command()
def effects(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
            after_from: Annotated[str, typer.Option(help="evaluate: the evaluate stage's per-query values of the "
                                                    "exported models; pytorch: score the compensated models here "
                                                    "(an experiment that stops before export)")] = "evaluate") -> None:
    """Compensation before/after per exit x ratio (evaluation.effects) -> paths.effects."""
    cfg = _params(params, overrides)
    from .pipeline.effects import compensation_effect

    result = compensation_effect(cfg, after_from=after_from)
    for row in result["compensation"]:
        b, a = row["before"]["drop"], row["after"]["drop"]
        typer.echo(f"exit {row['exit_layer']:>2} ratio {row['ratio']}: drop before {b['mean']:+.4f} "
                   f"[{b['low']:+.4f}, {b['high']:+.4f}], after {a['mean']:+.4f} [{a['low']:+.4f}, {a['high']:+.4f}], "
                   f"recovered {row['recovered']:.2f} {row['recovered_ci']}")


@app.command("experiment-args")
def experiment_args(name: Annotated[str, typer.Argument(help="a params set in configs/experiments/<name>.yaml")],
                    folder: Path = Path("configs/experiments")) -> None:
    """Print a named params set as `-S key=value` arguments for `dvc exp run` (values as compact JSON/YAML).

    Unless the set names its own, it also points ``paths.checkpoints`` at
    ``checkpoints/experiments/<name>`` in this workspace, as an absolute path: ``dvc exp run --temp``
    (``make experiment``) trains in a temporary copy of the repository, and checkpoints written there are
    gone when the run is interrupted, so a rerun of an hours-long set would start over instead of resuming.
    No stage depends on ``paths.checkpoints``, so the run-cache is not affected by where they go.
    """
    import yaml

    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"no params set {path}; known: {', '.join(known) or 'none'}")
    sets = yaml.safe_load(path.read_text()) or {}
    if "paths.checkpoints" not in sets:
        checkpoints = str(Path("checkpoints", "experiments", name).resolve())
        if any(c.isspace() or c in "*?[" for c in checkpoints):  # `make experiment` word-splits and globs our output
            raise ValueError(f"this checkout's path {checkpoints!r} has a space or a glob character; set "
                             f"paths.checkpoints in {path} to a path without them")
        sets["paths.checkpoints"] = checkpoints
    from .config import load_params

    load_params(Path("params.yaml"), [f"{k}={json.dumps(v)}" for k, v in sets.items()])  # fail early on a bad key
    # "++": a mapping may add keys to one that params.yaml has (e.g. an empty {}), which plain "k=v" refuses
    typer.echo(" ".join(f"-S {'++' if isinstance(v, dict) else ''}{k}={_override_value(v)}" for k, v in sets.items()))


def _override_value(value) -> str:
    """A value in the override grammar DVC's ``-S`` parses (Hydra's): JSON, except that mapping keys
    are bare (``{8:8.0}``; Hydra refuses the quoted ``{"8":8.0}``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # Hydra keeps a "\u00e9" escape as those six characters


@app.command("compare-runs", cls=_ListOptionsCommand)
def compare_runs_command(
    a: Annotated[str, typer.Option(help="learning-curve JSON of run A: a file, or REV:path (e.g. an experiment ref)")],
    b: Annotated[str, typer.Option(help="learning-curve JSON of run B, on the same eval set")],
    exits: Annotated[Optional[list[int]], typer.Option(help="exit layers to compare")] = None,
    measure: str = "nDCG@10",
    params: Annotated[Optional[Path], typer.Option("--params", "-p", help="also pair A and B with the first "
                                                   "stage's (BM25) order on this params file's eval set")] = None,
) -> None:
    """Paired per-query difference A - B of two self-distilled models at each exit (final snapshots)."""
    from .pipeline.effects import compare_runs

    def load(ref: str) -> dict:
        if Path(ref).is_file():
            return json.loads(Path(ref).read_text())
        import subprocess

        rev, _, path = ref.partition(":")
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode != 0:
            raise FileNotFoundError(f"{ref}: not a file, and git cannot show it ({shown.stderr.strip()})")
        return json.loads(shown.stdout)

    first, second = load(a), load(b)
    exits = exits or sorted({p["exit_layer"] for p in first["points"]})
    if not exits:  # the default run's curve is empty: nothing compared is not a result
        raise ValueError(f"{a}: the learning curve has no points ({first.get('note') or 'no snapshot was scored'}; "
                         "rerun with evaluation.learning_curve: true)")
    rows = compare_runs(first, second, exits, measure)
    for row in rows:
        d = row["difference"]
        typer.echo(f"exit {row['exit_layer']:>2}: A {row['a']:.4f}  B {row['b']:.4f}  A-B {d['mean']:+.4f} "
                   f"[{d['low']:+.4f}, {d['high']:+.4f}] p={d['p_value']:.3g} (n={d['n']})")
    if params is not None:  # BM25's order as a third "run" on the same eval set (the identity must match)
        from .pipeline.evaluation import eval_identity, first_stage_per_query, load_eval_set

        cfg = _params(params, None)
        queries, qrels = load_eval_set(cfg)
        bm25 = first_stage_per_query(queries, qrels, [measure])
        first_stage = {"identity": eval_identity(queries, qrels, cfg.data.eval_split),
                       "points": [{"exit_layer": k, "step": 0, "per_query": bm25} for k in exits]}
        if first["identity"] != first_stage["identity"]:
            _fail(f"{params}: its eval set ({cfg.paths.eval_candidates}) is not the one the learning curves "
                  "were computed on; give the params of the run that produced them")
        for name, curve in (("A", first), ("B", second)):
            for row in compare_runs(curve, first_stage, exits, measure):
                d = row["difference"]
                typer.echo(f"exit {row['exit_layer']:>2}: {name} {row['a']:.4f}  BM25 {row['b']:.4f}  {name}-BM25 "
                           f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] p={d['p_value']:.3g} (n={d['n']})")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Rerank the eval candidates with every exported model; writes paths.metrics and paths.plots.

    With distributed.processes > 1 the workers share the scoring and worker 0 writes the metrics."""
    cfg = _params(params, overrides)
    _maybe_relaunch(cfg, ["evaluate", "-p", str(params), *_set_args(overrides)])
    from .core.errors import CheckFailed
    from .pipeline.evaluation import evaluate as run_evaluation
    from .pipeline.evaluation import format_table

    try:
        per_layer_metrics = run_evaluation(cfg)
    except CheckFailed as err:
        _fail(err, 1)
    except (ValueError, FileNotFoundError) as err:
        _fail(err, 2)
    if not per_layer_metrics:
        return  # a worker other than 0
    typer.echo(format_table(per_layer_metrics))
    typer.echo(f"metrics: {cfg.paths.metrics}; plots: {cfg.paths.plots}")


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    from .core.jsonl import read_jsonl

    rows = []
    for where, obj in read_jsonl(path, what="pairs file"):
        try:
            rows.append((obj["query"], obj["passage"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: expected {{\"query\": str, \"passage\": str}} ({err})") from None
    return rows


# --- release: gate, model registry, publish/download, scheduled flow ---------------------------

RepoOpt = Annotated[Path, typer.Option("--repo", help="project checkout (git + DVC)")]


@app.command()
def gate(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, repo: RepoOpt = Path("."),
         baseline: Annotated[Optional[str], typer.Option(help="compare with this release tag")] = None) -> None:
    """Compare metrics with the last release; exit 1 if any exit layer regressed (report in paths.gate_report)."""
    from .release.gate import run_gate

    p = _params(params, overrides)
    report = run_gate(p, repo, baseline=baseline)
    typer.echo(report.to_markdown())
    if not report.passed:
        _fail(RuntimeError(f"gate failed: regressed {', '.join(report.regressions)}"), 1)


@app.command()
def artifacts(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, repo: RepoOpt = Path("."),
              check: Annotated[bool, typer.Option(help="only check; exit 1 when out of sync")] = False) -> None:
    """Write the exit models (export.exit_layers x export.ratios, and the exit specialists of specialist.exits) into dvc.yaml `artifacts:` (type model)."""
    from .release.registry import ReleaseError, artifacts_out_of_sync, sync_artifacts

    p = _params(params, overrides)
    try:
        if check:
            problems = artifacts_out_of_sync(p, repo)
            if problems:
                _fail(ReleaseError("; ".join(problems)), 1)
            typer.echo("dvc.yaml artifacts are in sync")
            return
        typer.echo("dvc.yaml artifacts updated" if sync_artifacts(p, repo) else "dvc.yaml artifacts already in sync")
    except ReleaseError as err:
        _fail(err, 2)


@app.command()
def publish(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, repo: RepoOpt = Path("."),
            version: Annotated[Optional[str], typer.Option(help="explicit version, e.g. v1.2.0")] = None,
            dry_run: Annotated[bool, typer.Option(help="check and gate only")] = False,
            skip_gate: Annotated[bool, typer.Option(help="publish despite a failed gate: an explicit waiver, recorded "
                                                          "in the release record, commit and tags")] = False,
            abandon: Annotated[bool, typer.Option(help="give up this checkout's interrupted publish instead of "
                                                        "completing it (refused once it is public)")] = False) -> None:
    """Gate, commit the reproduced state, push the exit models to the DVC remote and tag the version.

    The gate policy (gate.*, evaluation.*) is the committed one: -S overrides of it are refused. An
    interrupted publish is completed by the next run, or given up with --abandon.
    """
    from .release.registry import abandon as do_abandon
    from .release.registry import publish as do_publish

    p = _params(params, overrides)
    if abandon:
        if version or dry_run or skip_gate:
            _fail(ValueError("--abandon takes no --version, --dry-run or --skip-gate"), 2)
        typer.echo(json.dumps(do_abandon(p, repo).to_dict()))
        return
    result = do_publish(p, repo, version=version, dry_run=dry_run, skip_gate=skip_gate, overrides=overrides or [],
                        params_file=str(params.resolve()))  # -p is relative to the working directory, not --repo
    typer.echo(json.dumps(result.to_dict()))


@app.command()
def download(version: Annotated[str, typer.Option(help="release tag, e.g. v2026.1123.0, or latest")],
             layer: Annotated[int, typer.Option(help="exit layer")],
             ratio: Annotated[int, typer.Option(help="token compression ratio")] = 1,
             repo: Annotated[str, typer.Option(help="git URL or path of the project")] = ".",
             out: Annotated[Path, typer.Option(help="folder to put the model folder in")] = Path("downloads"),
             remote: Annotated[Optional[str], typer.Option(help="DVC remote name (default: the release's)")] = None,
             remote_url: Annotated[Optional[str], typer.Option(help="DVC remote URL, for tags made before "
                                                                    "the remote existed")] = None,
             variant: Annotated[Optional[str], typer.Option(
                 help="specialist: the release's exit specialist at --layer (ratio 1)")] = None) -> None:
    """Download one released exit model into OUT/<version>/ratio-<r> (its ratio's folder: every exit of the
    ratio beside one weights file; an exit specialist: OUT/<version>/exit-KK-ratio-1-specialist), every
    file's sha256 checked against the release record committed at the version's tag."""
    from .release.registry import download as do_download

    dest = do_download(version, layer, ratio, repo=repo, out=out, remote_name=remote, remote_url=remote_url,
                       variant=variant)
    typer.echo(str(dest))


@app.command()
def releases(repo: Annotated[str, typer.Option(help="git URL or path of the project")] = ".",
             as_json: Annotated[bool, typer.Option("--json", help="JSON instead of markdown")] = False,
             remote_url: Annotated[Optional[str], typer.Option(help="DVC remote URL override")] = None) -> None:
    """List released versions with their per-layer metrics (read at each tag)."""
    from .release.registry import list_releases, releases_markdown
    from .release.revisions import RevisionError

    try:
        found = list_releases(repo, remote_url=remote_url)
    except RevisionError as err:
        _fail(err, 1)
    typer.echo(json.dumps(found, indent=2) if as_json else releases_markdown(found))


@app.command(cls=_ListOptionsCommand)
def serve(
    models: Annotated[Optional[Path], typer.Option(help="export folder with index.json (e.g. models/onnx)")] = None,
    version: Annotated[Optional[str], typer.Option(help="serve a release instead: vYYYY.MMDD.N or latest")] = None,
    repo: Annotated[str, typer.Option(help="with --version: git URL or path of the project")] = ".",
    pipeline: Annotated[Optional[Path], typer.Option(
        help="serve the pipeline's trained PyTorch model instead (its params.yaml): bf16 on GPUs and AMX CPUs")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="with --pipeline: auto (default), float32 or bfloat16")] = None,
    layers: Annotated[Optional[list[int]], typer.Option(
        help="exit layers to serve (default: all exported; with --pipeline export.exit_layers)")] = None,
    ratios: Annotated[Optional[list[int]], typer.Option(
        help="with --version: ratios to fetch; with --pipeline: ratios to load (default export.ratios)")] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: int = 8080,
    max_texts: Annotated[int, typer.Option(help="texts per request")] = 1000,
    max_queue: Annotated[int, typer.Option(help="queued requests per config before 429")] = 64,
    batch_window_ms: Annotated[float, typer.Option(help="micro-batching window")] = 2.0,
    threads: Annotated[Optional[int], typer.Option(
        help="ONNX Runtime intra-op threads per session (--pipeline: PyTorch's threads)")] = None,
    workers: Annotated[int, typer.Option(help="threads running sessions")] = 1,
    max_batch_pairs: Annotated[int, typer.Option(help="query-text pairs per model call")] = 256,
    payload_limit: Annotated[int, typer.Option(help="request body bytes; over it a 413 (TEI's default)")] = 2_000_000,
    auto_truncate: Annotated[bool, typer.Option(
        help="what a request's truncate left out or null means (TEI's --auto-truncate, true since TEI 1.9)")] = True,
    variant: Annotated[Optional[str], typer.Option(
        help="serve this variant in place of the shared-weight model where there is one: specialist (an exit "
             "specialist, specialist.exits)")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="API_KEY", show_default=False,
        help="require `Authorization: Bearer <key>` on every request but the health checks (TEI's --api-key)")] = None,
) -> None:
    """Serve exported models over HTTP: TEI-compatible POST /rerank, with exit_layer and ratio per request."""
    from .serving.server import ServerOptions, pipeline_pool
    from .serving.server import serve as run_server

    if sum(x is not None for x in (models, version, pipeline)) != 1:
        raise ValueError("give one of --models DIR, --version V (with --repo) or --pipeline params.yaml")
    if dtype is not None and pipeline is None:
        raise ValueError("--dtype applies to --pipeline (ONNX exports have their own dtype)")
    if variant is not None and pipeline is not None:
        raise ValueError("--variant applies to exported models (--models, --version); --pipeline serves the "
                         "shared-weight PyTorch model")
    options = ServerOptions(max_texts=max_texts, max_queue=max_queue, batch_window_ms=batch_window_ms,
                            threads=threads, workers=workers, max_batch_pairs=max_batch_pairs,
                            payload_limit=payload_limit, auto_truncate=auto_truncate, api_key=api_key or None)
    if pipeline is not None:
        pool = pipeline_pool(pipeline, ratios=ratios, exit_layers=layers, options=options, dtype=dtype)
        run_server(pool, host=host, port=port, options=options)
        return
    source = models
    if version is not None:
        from .release.registry import fetch_release

        version, folders = fetch_release(version, repo=repo, exit_layers=layers, ratios=ratios, variant=variant)
        source = folders
    run_server(source, host=host, port=port, options=options, version=version, exit_layers=layers, variant=variant)


@app.command()
def schedule(params: Annotated[str, typer.Option("--params", "-p", help="params file, relative to --repo")] = "params.yaml",
          overrides: SetOpt = None, repo: RepoOpt = Path("."),
          cron: Annotated[Optional[str], typer.Option(help='cron schedule, e.g. "0 3 * * 0"')] = None,
          interval: Annotated[Optional[float], typer.Option(help="seconds between runs (instead of cron)")] = None,
          name: Annotated[str, typer.Option(help="deployment name")] = "scheduled-release",
          force: bool = False, dry_run: bool = False) -> None:
    """Serve the release flow on a schedule (needs `prefect server start` and PREFECT_API_URL)."""
    from .release.scheduling import ScheduleError, serve_release

    try:
        serve_release(repo=repo, params=params, overrides=overrides or [], cron=cron, interval=interval,
                      name=name, force=force, dry_run=dry_run)
    except ScheduleError as err:
        _fail(err, 2)


if __name__ == "__main__":
    app()
