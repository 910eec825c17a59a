"""Per-layer evaluation: rerank the eval candidates with every exported model, measure quality and cost.

For each ONNX model in ``paths.onnx/index.json`` (one per exit layer x compress ratio) we rerank each
eval query's BM25 candidates, time every query, and score the ranking with ir-measures against the
qrels; the BM25 order itself is the baseline. A PyTorch check re-scores a few queries with the
adapters merged in PyTorch and records how far ONNX Runtime is from it.

Scoring backends are injected: ``scorer_factory(config) -> compute_score(pairs)``, so the same code
evaluates ONNX Runtime in the pipeline and any callable in tests.

>>> per_layer_metrics = evaluate(load_params("params.yaml"))
>>> per_layer_metrics["configs"]["exit-08_ratio-1"]["nDCG@10"]
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_dir, write_json
from .config import Params

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PLOT_DATA = "per_config.json"

Pair = tuple[str, str]
ScoreFn = Callable[[list[Pair]], Sequence[float]]


@dataclass(frozen=True)
class ExitConfig:
    """One exported model: ``index.json``'s entry with its folder resolved."""

    name: str  # exit-08_ratio-1
    exit_layer: int
    ratio: int
    compress_layers: tuple[int, ...]
    path: Path


ScorerFactory = Callable[[ExitConfig], ScoreFn]
# (pairs, exit_layers, compress_layers) -> one score list per exit layer, in the order given
PyTorchScorer = Callable[[list[Pair], list[int], tuple[int, ...]], list[list[float]]]


@dataclass(frozen=True)
class Candidate:
    doc_id: str
    text: str
    bm25: float


@dataclass(frozen=True)
class EvalQuery:
    query_id: str
    query: str
    candidates: tuple[Candidate, ...]

    @property
    def pairs(self) -> list[Pair]:
        return [(self.query, c.text) for c in self.candidates]


# ---------------------------------------------------------------------------------------------------
# Inputs


def read_index(onnx_dir: str | Path) -> list[ExitConfig]:
    """The exported models listed in ``index.json``, deepest-last within each ratio."""
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the export stage first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format_version") != 1:
            raise ValueError(f"format_version {index.get('format_version')!r}, expected 1")
        configs = [ExitConfig(name=str(m["name"]), exit_layer=int(m["exit_layer"]), ratio=int(m["ratio"]),
                              compress_layers=tuple(int(c) for c in m.get("compress_layers") or ()),
                              path=onnx_dir / m["path"]) for m in index["models"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a valid export index ({err})") from None
    if not configs:
        raise ValueError(f"{path}: lists no models")
    if len({c.name for c in configs}) != len(configs):
        raise ValueError(f"{path}: model names repeat")
    return sorted(configs, key=lambda c: (c.ratio, c.exit_layer))


def read_candidates(path: str | Path) -> list[EvalQuery]:
    """Eval candidates JSONL: ``{"query_id", "query", "candidates": [{"doc_id", "text", "bm25"}]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval candidates {path} do not exist: run the prepare stage first")
    queries, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query = EvalQuery(str(row["query_id"]), row["query"], tuple(
                    Candidate(str(c["doc_id"]), c["text"], float(c["bm25"])) for c in row["candidates"]))
                if not isinstance(query.query, str) or not all(isinstance(c.text, str) for c in query.candidates):
                    raise TypeError("query and candidate texts must be strings")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: expected {{\"query_id\", \"query\", \"candidates\": "
                                 f"[{{\"doc_id\", \"text\", \"bm25\"}}, ...]}} ({err})") from None
            if not query.candidates:
                raise ValueError(f"{path}:{number}: query {query.query_id} has no candidates")
            if len({c.doc_id for c in query.candidates}) != len(query.candidates):
                raise ValueError(f"{path}:{number}: query {query.query_id} lists a doc_id twice")
            if query.query_id in seen:
                raise ValueError(f"{path}:{number}: query {query.query_id} appears twice")
            seen.add(query.query_id)
            queries.append(query)
    if not queries:
        raise ValueError(f"{path}: no eval queries")
    return queries


# ---------------------------------------------------------------------------------------------------
# Scoring backends


def onnx_scorers(batch_size: int, threads: int | None = None) -> ScorerFactory:
    """The pipeline's backend: one ``OnnxReranker`` per exported folder."""

    def make(config: ExitConfig) -> ScoreFn:
        from .onnx_runtime import OnnxReranker

        reranker = OnnxReranker(config.path, threads=threads or None)
        return lambda pairs: reranker.compute_score(pairs, batch_size=batch_size)

    return make


def pytorch_scorer(params: Params, ratio: int) -> PyTorchScorer:
    """The PyTorch model at one width: base model + the ratio's adapter stack, merged in order."""
    from .inputs import PairEncoder
    from .reranker import MatryoshkaReranker

    model = params.model
    reranker = MatryoshkaReranker(model.name_or_path, peft_path=params.adapter_stack(ratio),
                                  start_layer=model.start_layer, layer_sep=model.layer_sep,
                                  batch_size=params.evaluation.batch_size, max_length=model.max_length,
                                  dtype=model.dtype, prompt=model.prompt)
    # The pipeline's truncation (query and passage budgets from params), as in training and export.
    reranker.encoder = PairEncoder(reranker.tokenizer, prompt=model.prompt, max_length=model.max_length,
                                   query_max_len=model.query_max_len, passage_max_len=model.passage_max_len)

    def score(pairs: list[Pair], exit_layers: list[int], compress_layers: tuple[int, ...]) -> list[list[float]]:
        scores = reranker.compute_score(pairs, cutoff_layers=list(exit_layers), compress_layers=compress_layers,
                                        compress_ratio=ratio)
        return [scores] if len(exit_layers) == 1 else scores

    return score


# ---------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Reranked:
    scores: dict[str, list[float]]  # query id -> one score per candidate, candidate order
    seconds: list[float]  # wall time per query


def rerank(queries: list[EvalQuery], score: ScoreFn, warmup: bool = True) -> Reranked:
    """Scores each query's candidates in one call (as served: one request per query), timing each."""
    if warmup:  # the first call allocates (ORT arenas, lazy init): keep it out of the timings
        score(queries[0].pairs[:2])
    result = Reranked({}, [])
    for query in queries:
        start = time.perf_counter()
        values = [float(s) for s in score(query.pairs)]
        result.seconds.append(time.perf_counter() - start)
        if len(values) != len(query.candidates) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"query {query.query_id}: expected {len(query.candidates)} finite scores, "
                             f"got {values[:5]}{'...' if len(values) > 5 else ''}")
        result.scores[query.query_id] = values
    return result


def to_run(queries: list[EvalQuery], scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {q.query_id: {c.doc_id: s for c, s in zip(q.candidates, scores[q.query_id])} for q in queries}


def measure(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], measures: list[str]) -> dict[str, float]:
    """Mean of each measure over the judged queries (ir-measures / trec_eval semantics)."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in measures]
    values = ir_measures.calc_aggregate(parsed, qrels, run)
    return {name: round(float(values[m]), 6) for name, m in zip(measures, parsed)}


def check_against_pytorch(params: Params, queries: list[EvalQuery], configs: list[ExitConfig],
                          onnx_scores: dict[str, dict[str, list[float]]],
                          pytorch_factory: Callable[[Params, int], PyTorchScorer] = pytorch_scorer) -> dict[str, Any]:
    """Max |ONNX Runtime - PyTorch| and whether each query's ranking agrees, on a few queries.

    ``evaluation.pytorch_check``: true = every exported exit at the largest exported ratio (one
    PyTorch forward yields all exits; the largest ratio exercises compression and the most adapters);
    a config name = that config; false = skipped.
    """
    setting = params.evaluation.pytorch_check
    if setting is False:
        return {"enabled": False}
    if setting is True:
        ratio = max(c.ratio for c in configs)
        checked = [c for c in configs if c.ratio == ratio]
    else:
        checked = [c for c in configs if c.name == setting]
        if not checked:
            raise ValueError(f"evaluation.pytorch_check={setting!r} names no exported model; "
                             f"exported: {[c.name for c in configs]}")
        ratio = checked[0].ratio
    limit = params.evaluation.pytorch_check_queries
    sample = queries[:limit] if limit else queries
    pairs = [p for q in sample for p in q.pairs]

    start = time.perf_counter()
    scorer = pytorch_factory(params, ratio)
    per_config: dict[str, dict[str, Any]] = {}
    for compress_layers in sorted({c.compress_layers for c in checked}):
        group = [c for c in checked if c.compress_layers == compress_layers]
        reference = scorer(pairs, [c.exit_layer for c in group], compress_layers)
        for config, torch_scores in zip(group, reference):
            onnx_flat = [s for q in sample for s in onnx_scores[config.name][q.query_id]]
            diff = max(abs(a - b) for a, b in zip(onnx_flat, torch_scores))
            agree, offset = True, 0
            for q in sample:
                n = len(q.candidates)
                agree &= _ranking(onnx_flat[offset:offset + n]) == _ranking(torch_scores[offset:offset + n])
                offset += n
            per_config[config.name] = {"max_abs_diff": float(diff), "rankings_agree": bool(agree)}
    del scorer
    gc.collect()
    tolerance = params.export.parity_tolerance
    max_diff = max(v["max_abs_diff"] for v in per_config.values())
    result = {"enabled": True, "ratio": ratio, "queries": len(sample), "pairs": len(pairs),
              "tolerance": tolerance, "max_abs_diff": max_diff,
              "rankings_agree": all(v["rankings_agree"] for v in per_config.values()),
              "passed": max_diff <= tolerance, "seconds": round(time.perf_counter() - start, 2),
              "configs": per_config}
    if not result["passed"]:
        log.warning("ONNX Runtime differs from PyTorch by %.3g (> %.3g) on %s", max_diff, tolerance, list(per_config))
    return result


def _ranking(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# ---------------------------------------------------------------------------------------------------
# The stage


def evaluate(params: Params, scorer_factory: ScorerFactory | None = None,
             pytorch_factory: Callable[[Params, int], PyTorchScorer] = pytorch_scorer) -> dict[str, Any]:
    """Evaluates every exported model; writes ``paths.metrics`` and ``paths.plots``; returns the metrics.

    Nothing is written unless every model was scored.
    """
    from .beir import load_qrels

    configs = read_index(params.paths.onnx)
    queries = read_candidates(params.paths.eval_candidates)
    all_qrels = load_qrels(params.data.beir_dir, params.data.eval_split)
    qrels = {q.query_id: all_qrels[q.query_id] for q in queries if q.query_id in all_qrels}
    if not qrels:
        raise ValueError(f"none of the {len(queries)} eval queries has qrels in "
                         f"{params.data.beir_dir}/qrels/{params.data.eval_split}.tsv")
    if len(qrels) < len(queries):
        log.warning("%d of %d eval queries have no qrels and are left out of the measures",
                    len(queries) - len(qrels), len(queries))
    measures = list(params.evaluation.measures)
    factory = scorer_factory or onnx_scorers(params.evaluation.batch_size, params.evaluation.threads)
    n_pairs = sum(len(q.candidates) for q in queries)

    bm25 = {q.query_id: {c.doc_id: c.bm25 for c in q.candidates} for q in queries}
    per_config: dict[str, dict[str, Any]] = {}
    onnx_scores: dict[str, dict[str, list[float]]] = {}
    for config in configs:
        score = factory(config)
        result = rerank(queries, score)
        del score
        gc.collect()  # one model in memory at a time
        total = sum(result.seconds)
        per_config[config.name] = {
            "exit_layer": config.exit_layer, "ratio": config.ratio,
            **measure(to_run(queries, result.scores), qrels, measures),
            "latency_ms_per_query": round(1000 * total / len(queries), 3),
            "pairs_per_s": round(n_pairs / total, 3),
        }
        onnx_scores[config.name] = result.scores
        log.info("%s: %s", config.name, per_config[config.name])

    per_layer_metrics = {
        "format_version": FORMAT_VERSION,
        "eval": {"queries": len(qrels), "candidates": max(len(q.candidates) for q in queries), "pairs": n_pairs},
        "baseline": {"bm25": measure(bm25, qrels, measures)},
        "configs": per_config,
        "pytorch_check": check_against_pytorch(params, queries, configs, onnx_scores, pytorch_factory),
    }
    write_plots(per_layer_metrics, params.paths.plots, measures)
    write_json(params.paths.metrics, per_layer_metrics)
    return per_layer_metrics


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_rows(per_layer_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per config: the DVC plot data (x: exit_layer or latency, y: a measure, color: ratio)."""
    rows = [{"config": name, **values} for name, values in per_layer_metrics["configs"].items()]
    return sorted(rows, key=lambda r: (r["ratio"], r["exit_layer"]))


def write_plots(per_layer_metrics: dict[str, Any], plots_dir: str | Path, measures: list[str]) -> None:
    """``per_config.json`` for ``dvc plots``, and PNGs for offline viewing (dvc's HTML loads vega online)."""
    with atomic_dir(plots_dir) as tmp:
        (tmp / PLOT_DATA).write_text(json.dumps(plot_rows(per_layer_metrics), indent=2) + "\n", encoding="utf-8")
        try:
            import matplotlib
        except ImportError:
            log.warning("matplotlib is not installed: no PNG plots")
            return
        matplotlib.use("Agg")
        _render_png(per_layer_metrics, measures, "exit_layer", "exit layer", tmp / "quality_vs_exit_layer.png")
        _render_png(per_layer_metrics, measures, "latency_ms_per_query", "latency per query (ms, measured)",
                    tmp / "quality_vs_latency.png")


def _render_png(per_layer_metrics: dict[str, Any], measures: list[str], x: str, x_label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = plot_rows(per_layer_metrics)
    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    for ax, name in zip(axes[0], measures):
        for ratio in ratios:
            line = [r for r in rows if r["ratio"] == ratio]
            line.sort(key=lambda r: r[x])
            ax.plot([r[x] for r in line], [r[name] for r in line], marker="o", label=f"ratio {ratio}")
            if x != "exit_layer":
                for r in line:
                    ax.annotate(str(r["exit_layer"]), (r[x], r[name]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.axhline(per_layer_metrics["baseline"]["bm25"][name], color="grey", linestyle="--", label="BM25")
        ax.set_xlabel(x_label)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{per_layer_metrics['eval']['queries']} queries x {per_layer_metrics['eval']['candidates']} "
                 f"candidates" + ("; points labelled by exit layer" if x != "exit_layer" else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(per_layer_metrics: dict[str, Any]) -> str:
    """A console table: one row per config plus the BM25 baseline."""
    measures = list(per_layer_metrics["baseline"]["bm25"])
    header = ["config"] + measures + ["ms/query", "pairs/s"]
    lines = ["  ".join(f"{h:>16}" if i == 0 else f"{h:>9}" for i, h in enumerate(header))]
    lines.append(f"{'bm25':>16}  " + "  ".join(f"{per_layer_metrics['baseline']['bm25'][m]:>9.4f}" for m in measures))
    for name, v in per_layer_metrics["configs"].items():
        cells = [f"{v[m]:>9.4f}" for m in measures] + [f"{v['latency_ms_per_query']:>9.1f}", f"{v['pairs_per_s']:>9.1f}"]
        lines.append(f"{name:>16}  " + "  ".join(cells))
    check = per_layer_metrics["pytorch_check"]
    if check.get("enabled"):
        lines.append(f"PyTorch check (ratio {check['ratio']}, {check['queries']} queries): max |ORT - PyTorch| = "
                     f"{check['max_abs_diff']:.2e}, rankings agree: {check['rankings_agree']}, "
                     f"{'passed' if check['passed'] else 'FAILED'} (tolerance {check['tolerance']:g})")
    return "\n".join(lines)
