"""Per-layer evaluation: quality of every exit x ratio with confidence intervals, cost per exported model.

For each ratio, the export's all-exits model scores every eval pair once and yields the scores of
every exit (one pass instead of one per exit: the shallow exits are prefixes of the deep one).
Quality per (exit, ratio): nDCG@10, RR@10, R@10 (ir-measures, trec_eval semantics) per query,
their mean with a 95% bootstrap interval over queries, and paired differences against the
first-stage BM25 order, a random order of the same candidates and, when ``metrics/baselines.json``
holds it, the untrained model at the same exit. Cost: each exported exit model re-ranks a small
sample of queries one request at a time (as served), which also checks that it gives the same
scores as the all-exits pass. A PyTorch check re-scores a few queries with the adapters merged in
PyTorch; the stage fails (exit 1, nothing written) when ONNX Runtime differs beyond the export
tolerance or ranks differently.

Outputs (written only when everything passed):

* ``paths.metrics`` (``metrics/per_layer.json``): per config means, intervals, deltas, latency;
  baselines; the eval set's identity (query ids, candidates, qrels hash); the PyTorch check.
* ``paths.per_query`` (``metrics/per_query.json``): every system's value per query and measure
  (what the release gate's paired test needs).
* ``paths.summary`` (``metrics/summary.json``): a few flat headline numbers for ``dvc exp show``.
* ``paths.plots``: DVC plot data and PNGs.

Scoring backends are injected (``scorer_factory``, ``latency_factory``), so tests evaluate any
callable with the same code.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Params
from ..core.atomic import atomic_dir, write_json
from ..core.errors import CheckFailed, InputError
from ..serving.artifacts import (
    ExportedConfig,
    config_name,
    read_index,
    read_index_extra,
)
from . import statistics

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
PLOT_DATA = "per_config.json"
RANDOM_SEEDS = 50  # random orders averaged per query for the random baseline

Pair = tuple[str, str]
ScoreFn = Callable[[list[Pair]], Sequence[float]]
AllExitsFn = Callable[[list[Pair]], dict[int, Sequence[float]]]


class EvaluationCheckFailed(CheckFailed):
    """ONNX Runtime and PyTorch disagree, or an exit model disagrees with the all-exits pass."""


@dataclass(frozen=True)
class RatioModels:
    """What evaluation scores for one ratio: its all-exits model and the exported exit models."""

    ratio: int
    exit_layers: tuple[int, ...]
    compress_layers: tuple[int, ...]
    all_exits_path: Path | None
    configs: tuple[ExportedConfig, ...]


ScorerFactory = Callable[[RatioModels], AllExitsFn]
LatencyFactory = Callable[[ExportedConfig], ScoreFn]
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


def scores_by_query(queries: Sequence[EvalQuery], flat: Sequence[float]) -> dict[str, list[float]]:
    """Scores of every eval pair, in ``queries``' order -> {query id: that query's candidates' scores}."""
    out, offset = {}, 0
    for q in queries:
        out[q.query_id] = list(flat[offset:offset + len(q.candidates)])
        offset += len(q.candidates)
    return out


def ratio_models(onnx_dir: str | Path) -> list[RatioModels]:
    """The export grouped by ratio (float models only), with each ratio's all-exits model."""
    onnx_dir = Path(onnx_dir)
    configs = [c for c in read_index(onnx_dir) if c.variant is None]
    extra = {e["ratio"]: e for e in read_index_extra(onnx_dir).get("all_exits", [])}
    groups = []
    for ratio in sorted({c.ratio for c in configs}):
        members = tuple(sorted((c for c in configs if c.ratio == ratio), key=lambda c: c.exit_layer))
        entry = extra.get(ratio)
        groups.append(RatioModels(ratio, tuple(c.exit_layer for c in members), members[0].compress_layers,
                                  onnx_dir / entry["path"] if entry else None, members))
    return groups


def read_candidates(path: str | Path) -> list[EvalQuery]:
    """Eval candidates JSONL: ``{"query_id", "query", "candidates": [{"doc_id", "text", "bm25"}]}``."""
    from ..core.jsonl import read_jsonl

    queries, seen = [], set()
    for where, row in read_jsonl(path, what="eval candidates", hint="run the prepare stage first"):
        try:
            query = EvalQuery(str(row["query_id"]), row["query"], tuple(
                Candidate(str(c["doc_id"]), c["text"], float(c["bm25"])) for c in row["candidates"]))
            if not isinstance(query.query, str) or not all(isinstance(c.text, str) for c in query.candidates):
                raise TypeError("query and candidate texts must be strings")
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: expected {{\"query_id\", \"query\", \"candidates\": "
                             f"[{{\"doc_id\", \"text\", \"bm25\"}}, ...]}} ({err})") from None
        if not query.candidates:
            raise InputError(f"{where}: query {query.query_id} has no candidates")
        if len({c.doc_id for c in query.candidates}) != len(query.candidates):
            raise InputError(f"{where}: query {query.query_id} lists a doc_id twice")
        if query.query_id in seen:
            raise InputError(f"{where}: query {query.query_id} appears twice")
        seen.add(query.query_id)
        queries.append(query)
    if not queries:
        raise InputError(f"{path}: no eval queries")
    return queries


def eval_identity(queries: list[EvalQuery], qrels: dict[str, dict[str, int]], split: str) -> dict[str, Any]:
    """What makes two metrics files comparable: the same queries, candidates and judgements."""
    ids = sorted(q.query_id for q in queries)
    candidates = hashlib.sha256(json.dumps([[q.query_id, [c.doc_id for c in q.candidates]] for q in queries],
                                           sort_keys=True).encode()).hexdigest()
    judged = hashlib.sha256(json.dumps({q: qrels[q] for q in sorted(qrels)}, sort_keys=True).encode()).hexdigest()
    # the texts too: the same ids over a re-cleaned corpus or re-worded queries are other inputs
    texts = hashlib.sha256(json.dumps(sorted([q.query_id, q.query, [[c.doc_id, c.text] for c in q.candidates]]
                                             for q in queries), ensure_ascii=False).encode()).hexdigest()
    return {"split": split, "queries": len(ids), "query_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "candidates_per_query": max(len(q.candidates) for q in queries), "candidates_sha256": candidates,
            "qrels_sha256": judged, "texts_sha256": texts}


# ---------------------------------------------------------------------------------------------------
# Scoring backends


def onnx_all_exits(batch_size: int, threads: int | None = None) -> ScorerFactory:
    """The pipeline's quality backend: each ratio's all-exits ONNX model, one pass for every exit."""

    def make(models: RatioModels) -> AllExitsFn:
        from ..serving.onnx_runtime import OnnxReranker

        if models.all_exits_path is None:  # an export without the all-exits model: one pass per exit
            rerankers = {c.exit_layer: OnnxReranker(c.path, c.exit_layer, threads=threads or None)
                         for c in models.configs}
            return lambda pairs: {k: r.compute_score(pairs, batch_size=batch_size) for k, r in rerankers.items()}
        reranker = OnnxReranker(models.all_exits_path, threads=threads or None, all_exits=True)
        return lambda pairs: reranker.score_exits(pairs, batch_size=batch_size)

    return make


def onnx_latency(threads: int | None = None) -> LatencyFactory:
    """The pipeline's cost backend: one exported exit model, one query's candidates per call."""

    def make(config: ExportedConfig) -> ScoreFn:
        from ..serving.onnx_runtime import OnnxReranker

        reranker = OnnxReranker(config.path, config.exit_layer, threads=threads or None)
        return lambda pairs: reranker.compute_score(pairs, batch_size=len(pairs))

    return make


def pytorch_scorer(params: Params, ratio: int) -> PyTorchScorer:
    """The PyTorch model at one width: base model + the ratio's adapter stack, merged in order."""
    from ..serving.reranker import MatryoshkaReranker

    reranker = MatryoshkaReranker.from_pipeline(params, ratio=ratio, batch_size=params.evaluation.batch_size,
                                                dtype=params.model.torch_dtype())

    def score(pairs: list[Pair], exit_layers: list[int], compress_layers: tuple[int, ...]) -> list[list[float]]:
        scores = reranker.compute_score(pairs, cutoff_layers=list(exit_layers), compress_layers=compress_layers,
                                        compress_ratio=ratio)
        return [scores] if len(exit_layers) == 1 else scores

    score.reranker = reranker  # what it scores with (its input format, for the contract test)
    return score


# ---------------------------------------------------------------------------------------------------
# Measuring


def per_query(queries: list[EvalQuery], scores: dict[str, Sequence[float]], qrels: dict[str, dict[str, int]],
              measures: list[str]) -> dict[str, dict[str, float]]:
    """{measure: {query id: value}} for one system, over ``queries`` (ir-measures; a query with no
    relevant doc scores 0; tied scores in trec_eval's order, doc id descending, for every measure). Keyed by the
    queries scored,
    not by ``qrels``: a caller scoring a subset with the full qrels gets the subset's mean, not one
    diluted by zeros for queries it never ran."""
    import ir_measures

    parsed = {name: ir_measures.parse_measure(name) for name in measures}
    for q in queries:  # a NaN sorts anywhere: ir-measures would score an all-NaN query as a perfect ranking
        given = scores[q.query_id]
        if len(given) != len(q.candidates) or not all(math.isfinite(float(s)) for s in given):
            raise EvaluationCheckFailed(f"query {q.query_id}: expected {len(q.candidates)} finite scores (one per "
                                        f"candidate), got {len(given)}: {list(given)[:5]}")
    # One tie-break for every measure: ir-measures' providers differ (pytrec_eval, nDCG@10 / R@10: doc id
    # descending, trec_eval's rule; msmarco, RR@10: ascending), so one run gave two rankings. The run it gets is
    # the ranking itself (n, n-1, ..., 1), tie-free, ties in trec_eval's order: neutral, where the candidate
    # (BM25) order would hand a collapsed exit, all ties, the first stage's quality.
    run = {}
    for q in queries:
        given = [float(s) for s in scores[q.query_id]]
        by_id = sorted(range(len(given)), key=lambda i: q.candidates[i].doc_id, reverse=True)
        order = sorted(by_id, key=lambda i: -given[i])  # stable: ties stay in doc id descending order
        run[q.query_id] = {q.candidates[i].doc_id: float(len(order) - rank) for rank, i in enumerate(order)}
    judged = {q: qrels[q] for q in run if q in qrels}
    values: dict[str, dict[str, float]] = {name: {q: 0.0 for q in run} for name in measures}
    by_measure = {m: name for name, m in parsed.items()}
    for metric in ir_measures.iter_calc(list(parsed.values()), judged, run):
        values[by_measure[metric.measure]][metric.query_id] = float(metric.value)
    return values


def first_stage_per_query(queries: list[EvalQuery], qrels: dict[str, dict[str, int]],
                          measures: list[str]) -> dict[str, dict[str, float]]:
    """The candidates in the first stage's (BM25) order: the reference every re-ranker is paired with."""
    return per_query(queries, {q.query_id: [c.bm25 for c in q.candidates] for q in queries}, qrels, measures)


def random_order_per_query(queries: list[EvalQuery], qrels: dict[str, dict[str, int]], measures: list[str],
                           seeds: int = RANDOM_SEEDS) -> dict[str, dict[str, float]]:
    """The expected value of a random order of each query's candidates (mean over seeded shuffles)."""
    total: dict[str, dict[str, float]] = {m: {q.query_id: 0.0 for q in queries} for m in measures}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        scores = {q.query_id: rng.random(len(q.candidates)).tolist() for q in queries}
        for measure, values in per_query(queries, scores, qrels, measures).items():
            for q, v in values.items():
                total[measure][q] += v / seeds
    return total


def summarise(values: dict[str, dict[str, float]], references: dict[str, dict[str, dict[str, float]]],
              confidence: float, resamples: int) -> dict[str, Any]:
    """Mean + interval per measure, and the paired difference against each reference system."""
    out: dict[str, Any] = {}
    for measure, per_q in values.items():
        a = np.array([per_q[q] for q in sorted(per_q)])
        interval = statistics.mean_interval(a, confidence, resamples)
        out[measure] = round(interval.mean, 6)
        out[f"{measure}_ci"] = [round(interval.low, 6), round(interval.high, 6)]
        for name, reference in references.items():
            x, y = statistics.aligned(per_q, reference[measure])
            out.setdefault(f"vs_{name}", {})[measure] = statistics.paired_difference(x, y, confidence, resamples).to_dict()
    return out


def rerank_all_exits(queries: list[EvalQuery], score: AllExitsFn, exits: Sequence[int]) -> dict[int, dict[str, list[float]]]:
    """{exit: {query id: scores in candidate order}} from one pass over every eval pair."""
    pairs = [p for q in queries for p in q.pairs]
    result = score(pairs)
    missing = [k for k in exits if k not in result]
    if missing:
        raise EvaluationCheckFailed(f"the all-exits model gave no scores for exit(s) {missing}")
    out: dict[int, dict[str, list[float]]] = {}
    for k in exits:
        values = [float(s) for s in result[k]]
        if len(values) != len(pairs) or not all(math.isfinite(v) for v in values):
            raise EvaluationCheckFailed(f"exit {k}: expected {len(pairs)} finite scores, got {len(values)}")
        out[k] = scores_by_query(queries, values)
    return out


def time_config(sample: list[EvalQuery], score: ScoreFn) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds per query (one call per query, as served) and the scores, after one warm-up call."""
    score(sample[0].pairs[:2])  # the first call allocates (ORT arenas, lazy init): not timed
    seconds, scores = [], {}
    for query in sample:
        start = time.perf_counter()
        values = [float(s) for s in score(query.pairs)]
        seconds.append(time.perf_counter() - start)
        scores[query.query_id] = values
    return seconds, scores


def pytorch_check_configs(params: Params, groups: list[RatioModels]) -> list:
    """The exported configs ``evaluation.pytorch_check`` names (none when it is false); a name that is not
    exported is an error, raised before any scoring (``evaluate`` asks first)."""
    setting = params.evaluation.pytorch_check
    if setting is False:
        return []
    configs = [c for g in groups for c in g.configs]
    if setting is True:
        ratio = max(g.ratio for g in groups)
        return [c for c in configs if c.ratio == ratio]
    checked = [c for c in configs if c.name == setting]
    if not checked:
        raise InputError(f"evaluation.pytorch_check={setting!r} names no exported model; "
                         f"exported: {[c.name for c in configs]}")
    return checked


def check_against_pytorch(params: Params, queries: list[EvalQuery], groups: list[RatioModels],
                          scores: dict[str, dict[str, list[float]]],
                          pytorch_factory: Callable[[Params, int], PyTorchScorer] = pytorch_scorer) -> dict[str, Any]:
    """Max |ONNX Runtime - PyTorch| (float32 comparison) and whether each query's ranking agrees.

    ``evaluation.pytorch_check``: true = every exported exit at the largest exported ratio (one
    PyTorch forward yields all exits; the largest ratio exercises compression and the most
    adapters); a config name = that config; false = skipped. The tolerance is the export's
    (``export.fp16_tolerance`` for float16 exports), on |ORT - PyTorch| / max(1, |PyTorch|).
    """
    checked = pytorch_check_configs(params, groups)
    if not checked:
        return {"enabled": False}
    ratio = checked[0].ratio
    limit = params.evaluation.pytorch_check_queries
    sample = queries[:limit] if limit else queries
    pairs = [p for q in sample for p in q.pairs]
    start = time.perf_counter()
    # float32, as the export's parity check: model.dtype auto is bf16 on CUDA, which alone differs beyond the tolerance
    scorer = pytorch_factory(params.model_copy(update={"model": params.model.model_copy(update={"dtype": "float32"})}),
                             ratio)
    reference = scorer(pairs, [c.exit_layer for c in checked], checked[0].compress_layers if ratio > 1 else ())
    per_config: dict[str, dict[str, Any]] = {}
    for config, torch_scores in zip(checked, reference):
        onnx_flat = np.array([s for q in sample for s in scores[config.name][q.query_id]], dtype=np.float32)
        torch_flat = np.array(torch_scores, dtype=np.float32)
        diff = float(np.abs(onnx_flat - torch_flat).max())
        # Relative to the score's size above 1: raw exit logits reach tens, where float32 through
        # 24+ layers differs by more than 1e-4 in absolute terms between two correct backends.
        scaled = float((np.abs(onnx_flat - torch_flat) / np.maximum(1.0, np.abs(torch_flat))).max())
        agree, offset = True, 0
        for q in sample:
            n = len(q.candidates)
            agree &= _ranking(onnx_flat[offset:offset + n]) == _ranking(torch_flat[offset:offset + n])
            offset += n
        per_config[config.name] = {"max_abs_diff": diff, "max_scaled_diff": scaled, "rankings_agree": bool(agree)}
    del scorer
    gc.collect()
    export = params.export
    tolerance = export.fp16_tolerance if export.dtype == "float16" else export.parity_tolerance
    max_diff = max(v["max_abs_diff"] for v in per_config.values())
    max_scaled = max(v["max_scaled_diff"] for v in per_config.values())
    agree = all(v["rankings_agree"] for v in per_config.values())
    result = {"enabled": True, "ratio": ratio, "queries": len(sample), "pairs": len(pairs), "dtype": "float32",
              "tolerance": tolerance, "max_abs_diff": max_diff, "max_scaled_diff": max_scaled, "rankings_agree": agree,
              "passed": bool(max_scaled <= tolerance),
              "seconds": round(time.perf_counter() - start, 2), "configs": per_config}
    if not max_scaled <= tolerance:
        raise EvaluationCheckFailed(f"ONNX Runtime differs from PyTorch by {max_scaled:.3g} (|difference| / "
                                    f"max(1, |score|); > tolerance {tolerance:g}) "
                                    f"on {[n for n, v in per_config.items() if v['max_scaled_diff'] > tolerance]}; "
                                    "nothing was written")
    if not agree:
        log.warning("rankings differ between ONNX Runtime and PyTorch within tolerance (tied scores): %s",
                    [n for n, v in per_config.items() if not v["rankings_agree"]])
    return result


def _ranking(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# ---------------------------------------------------------------------------------------------------
# The stage


def load_eval_set(params: Params) -> tuple[list[EvalQuery], dict[str, dict[str, int]]]:
    """The eval queries that have judgements, and their qrels."""
    from .beir import load_qrels

    queries = read_candidates(params.paths.eval_candidates)
    all_qrels = load_qrels(params.data.beir_dir, params.data.eval_split)
    judged = [q for q in queries if q.query_id in all_qrels]
    if not judged:
        raise InputError(f"none of the {len(queries)} eval queries has qrels in "
                         f"{params.data.beir_dir}/qrels/{params.data.eval_split}.tsv")
    if len(judged) < len(queries):
        log.warning("%d of %d eval queries have no qrels and are left out", len(queries) - len(judged), len(queries))
    return judged, {q.query_id: all_qrels[q.query_id] for q in judged}


def evaluate(params: Params, scorer_factory: ScorerFactory | None = None, latency_factory: LatencyFactory | None = None,
             pytorch_factory: Callable[[Params, int], PyTorchScorer] = pytorch_scorer) -> dict[str, Any]:
    """Evaluates every exported model; writes metrics, per-query values, summary and plots; returns the metrics.

    Nothing is written unless every model was scored and every check passed.
    """
    ev = params.evaluation
    groups = ratio_models(params.paths.onnx)
    pytorch_check_configs(params, groups)  # a misnamed config fails now, not after every pass
    queries, qrels = load_eval_set(params)
    measures = list(ev.measures)
    quality = scorer_factory or onnx_all_exits(ev.batch_size, ev.threads)
    cost = latency_factory or onnx_latency(ev.threads)
    identity = eval_identity(queries, qrels, params.data.eval_split)
    n_pairs = sum(len(q.candidates) for q in queries)

    systems: dict[str, dict[str, dict[str, float]]] = {
        "bm25": first_stage_per_query(queries, qrels, measures),
        "random": random_order_per_query(queries, qrels, measures),
    }
    baselines = read_baselines(params, identity)
    scores: dict[str, dict[str, list[float]]] = {}
    latency: dict[str, dict[str, float]] = {}
    sample = queries[: max(1, ev.latency_queries)]
    started = time.perf_counter()
    scored = score_groups(params, groups, queries, quality)  # split across workers when there are several
    if scored is None:
        return {}  # a worker other than 0: its share is written, worker 0 measures and writes the metrics
    for group in groups:
        by_exit = scored[group.ratio]
        for config in group.configs:
            scores[config.name] = by_exit[config.exit_layer]
            systems[config.name] = per_query(queries, scores[config.name], qrels, measures)
            seconds, sampled = time_config(sample, cost(config))
            gc.collect()
            _check_same_scores(config.name, sampled, scores[config.name], params.export)
            latency[config.name] = {"latency_ms_per_query": round(1000 * float(np.median(seconds)), 3),
                                    "pairs_per_s": round(sum(len(q.candidates) for q in sample) / sum(seconds), 3),
                                    "latency_queries": len(sample)}
            log.info("%s: nDCG@10 %.4f, %.0f ms/query", config.name,
                     float(np.mean(list(systems[config.name][measures[0]].values()))),
                     latency[config.name]["latency_ms_per_query"])
    variants = [c for c in read_index(params.paths.onnx) if c.variant is not None]
    variant_info: dict[str, dict[str, Any]] = {}
    for config in variants:  # quantized copies and exit specialists: one call per query with their own model
        seconds, scores[config.name] = time_config(queries, cost(config))
        gc.collect()
        systems[config.name] = per_query(queries, scores[config.name], qrels, measures)
        float_name = config_name(config.exit_layer, config.ratio)
        latency[config.name] = {"latency_ms_per_query": round(1000 * float(np.median(seconds)), 3),
                                "pairs_per_s": round(n_pairs / sum(seconds), 3), "latency_queries": len(queries)}
        variant_info[config.name] = {"variant": config.variant, "of": float_name,
                                     "spearman_vs_float": round(_mean_spearman(scores[config.name], scores[float_name]), 4)}
    log.info("scored %d configs x %d pairs in %.0f s", len(scores), n_pairs, time.perf_counter() - started)

    references = {"bm25": systems["bm25"], "random": systems["random"]}
    configs: dict[str, dict[str, Any]] = {}
    for group in [*groups, *[RatioModels(c.ratio, (c.exit_layer,), c.compress_layers, None, (c,)) for c in variants]]:
        for config in group.configs:
            refs = dict(references)
            untrained = (baselines or {}).get("per_query", {}).get(config_name(config.exit_layer, 1))
            if untrained is not None:
                refs["untrained"] = untrained
            configs[config.name] = {"exit_layer": config.exit_layer, "ratio": config.ratio,
                                    **summarise(systems[config.name], refs, ev.confidence, ev.bootstrap_resamples),
                                    **latency[config.name],
                                    **variant_info.get(config.name, {}),
                                    "calibration": calibration_report(config, queries, qrels, scores[config.name])}
    per_layer_metrics = {
        "format_version": FORMAT_VERSION,
        "eval": {"queries": len(queries), "candidates": identity["candidates_per_query"], "pairs": n_pairs,
                 "confidence": ev.confidence, "identity": identity},
        "baselines": {name: summarise(systems[name], {}, ev.confidence, ev.bootstrap_resamples)
                      for name in ("bm25", "random")},
        "configs": configs,
        "pytorch_check": check_against_pytorch(params, queries, groups, scores, pytorch_factory),
    }
    if baselines and baselines.get("summary"):  # the default baselines stage scores no untrained model
        per_layer_metrics["baselines"]["untrained"] = baselines["summary"]
    write_plots(per_layer_metrics, params.paths.plots, measures)
    write_json(params.paths.per_query, {"format_version": FORMAT_VERSION, "identity": identity,
                                        "systems": {name: values for name, values in systems.items()}})
    write_json(params.paths.summary, summary(per_layer_metrics, measures[0]))
    write_json(params.paths.metrics, per_layer_metrics)
    return per_layer_metrics


def calibration_report(config: ExportedConfig, queries: list[EvalQuery], qrels: dict[str, dict[str, int]],
                       scores: dict[str, list[float]]) -> dict[str, Any] | None:
    """ECE of sigmoid(raw score) and of the export's Platt probability, on the queries it was *not* fitted on."""
    from ..serving.artifacts import MANIFEST, calibrated_probability, config_manifest
    from .calibration import expected_calibration_error

    if not (config.path / MANIFEST).is_file():
        return None  # a test backend without exported folders
    calibration = config_manifest(config).get("calibration")
    if not calibration:
        return None
    fitted_on = set(calibration.get("queries", []))
    held_out = [q for q in queries if q.query_id not in fitted_on]
    raw = np.array([s for q in held_out for s in scores[q.query_id]])
    labels = [int(qrels[q.query_id].get(c.doc_id, 0) > 0) for q in held_out for c in q.candidates]
    if not held_out:
        return {"a": calibration["a"], "b": calibration["b"], "held_out_queries": 0}
    return {"a": round(calibration["a"], 6), "b": round(calibration["b"], 6), "held_out_queries": len(held_out),
            "held_out_pairs": len(labels),
            "ece_sigmoid": round(expected_calibration_error(1 / (1 + np.exp(-raw)), labels), 6),
            "ece_calibrated": round(expected_calibration_error(calibrated_probability(calibration, raw), labels), 6)}


def score_groups(params: Params, groups: list[RatioModels], queries: list[EvalQuery], quality: ScorerFactory
                 ) -> dict[int, dict[int, dict[str, list[float]]]] | None:
    """{ratio: {exit: {query id: scores}}}: every eval pair through each ratio's all-exits model.

    Under ``distributed.processes`` > 1 (torch.distributed.run), worker r scores the queries
    r, r + W, r + 2W, ... and writes them beside the metrics; worker 0 waits for all and merges
    (the other workers return None). Latency is then measured by worker 0 alone.
    """
    from ..core.distributed import barrier, rank_and_world

    rank, world = rank_and_world()
    mine = [q for i, q in enumerate(queries) if i % world == rank]
    scored = {}
    for group in groups:
        scored[group.ratio] = rerank_all_exits(mine, quality(group), group.exit_layers) if mine else \
            {k: {} for k in group.exit_layers}
        gc.collect()
    if world == 1:
        return scored
    shares = Path(params.paths.metrics).parent
    write_json(shares / f".evaluate-share-{rank}.json", {str(r): {str(k): v for k, v in by_exit.items()}
                                                         for r, by_exit in scored.items()})
    barrier()
    if rank != 0:
        return None
    merged: dict[int, dict[int, dict[str, list[float]]]] = {g.ratio: {k: {} for k in g.exit_layers} for g in groups}
    for worker in range(world):
        path = shares / f".evaluate-share-{worker}.json"
        for r, by_exit in json.loads(path.read_text()).items():
            for k, values in by_exit.items():
                merged[int(r)][int(k)].update(values)
        path.unlink()
    return merged


def _mean_spearman(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """Mean over queries of the rank correlation of two systems' scores of the same candidates."""
    from scipy.stats import spearmanr

    values = [spearmanr(a[q], b[q]).statistic for q in a]
    return float(np.nanmean(values)) if values else float("nan")


def _check_same_scores(name: str, sampled: dict[str, list[float]], full: dict[str, list[float]], export) -> None:
    """The exit model's scores (timed sample) vs the all-exits pass: the same layers, but exit k's graph runs
    layer k for the last token only (export.py, ``_AllExits``), another order of float operations: within
    1e-3 of max(1, |score|) in float32, the export's fp16 tolerance for a float16 export."""
    tolerance = export.fp16_tolerance if export.dtype == "float16" else 1e-3
    worst = float(np.max([(np.abs(np.array(v) - np.array(full[q])) / np.maximum(1.0, np.abs(full[q]))).max()
                          if len(v) == len(full[q]) else math.inf for q, v in sampled.items()]))
    if not worst <= tolerance:  # NaN compares false: a non-finite score differs too
        raise EvaluationCheckFailed(f"{name}: the exported exit model differs from the all-exits pass by {worst:.3g} "
                                    f"(scaled by max(1, |score|); tolerance {tolerance:g})")


def summary(per_layer_metrics: dict[str, Any], measure: str) -> dict[str, Any]:
    """A few flat numbers for ``dvc exp show``: each config's headline measure, and BM25's."""
    out: dict[str, Any] = {"eval_queries": per_layer_metrics["eval"]["queries"],
                           f"bm25_{measure}": per_layer_metrics["baselines"]["bm25"][measure],
                           f"random_{measure}": per_layer_metrics["baselines"]["random"][measure]}
    for name, values in per_layer_metrics["configs"].items():
        out[f"{name}_{measure}"] = values[measure]
    return out


# ---------------------------------------------------------------------------------------------------
# The untrained baseline (its own stage: it depends only on the base model and the eval set)


def read_baselines(params: Params, identity: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(params.paths.baselines)
    if not path.is_file():
        return None
    baselines = json.loads(path.read_text(encoding="utf-8"))
    if baselines.get("identity") != identity:
        log.warning("%s was computed on another eval set; the untrained comparison is left out", path)
        return None
    return baselines


def untrained_baseline(params: Params, scorer: PyTorchScorer | None = None) -> dict[str, Any]:
    """The base model before any training (score heads = the LM head's "Yes" row) at every exported exit.

    Written to ``paths.baselines`` with per-query values, so evaluation can report paired
    differences trained-minus-untrained. Cheap to keep: DVC reruns it only when the model, the
    input format or the eval set change.
    """
    from ..serving.reranker import MatryoshkaReranker

    ev, m = params.evaluation, params.model
    queries, qrels = load_eval_set(params)
    measures = list(ev.measures)
    identity = eval_identity(queries, qrels, params.data.eval_split)
    exits = sorted(set(params.export.exit_layers))
    if scorer is None:
        reranker = MatryoshkaReranker(m.name_or_path, input_format=m.input_format, start_layer=m.start_layer,
                                      layer_sep=m.layer_sep, batch_size=ev.batch_size, dtype=m.torch_dtype())

        def scorer(pairs, exit_layers, compress_layers):
            scores = reranker.compute_score(pairs, cutoff_layers=list(exit_layers))
            return [scores] if len(exit_layers) == 1 else scores  # one list per exit, as PyTorchScorer says

    pairs = [p for q in queries for p in q.pairs]
    result = {"format_version": FORMAT_VERSION, "identity": identity, "model": m.name_or_path,
              "input_format": m.input_format.to_dict(), "per_query": {}, "summary": {}}
    if ev.untrained_baseline:
        started = time.perf_counter()
        for k, values in zip(exits, scorer(pairs, exits, ())):  # one list of scores per exit
            name = config_name(k, 1)
            result["per_query"][name] = per_query(queries, scores_by_query(queries, values), qrels, measures)
            result["summary"][name] = summarise(result["per_query"][name], {}, ev.confidence, ev.bootstrap_resamples)
        result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(params.paths.baselines, result)
    return result


# ---------------------------------------------------------------------------------------------------
# The learning curve (self-distillation snapshots, PyTorch, ratio 1, every exported exit in one pass)


def snapshot_folders(params: Params) -> list[tuple[int, Path]]:
    """(step, adapter folder) of every snapshot and of the final self-distillation adapter."""
    root = Path(params.paths.self_distill)
    found = [(int(f.name[5:]), f) for f in sorted((root / "snapshots").glob("step-*"))
             if (f / "adapter_config.json").exists()]
    log_file = root / "training_log.json"
    final_step = json.loads(log_file.read_text())["steps"] if log_file.exists() else params.self_distill.max_steps
    return [item for item in found if item[0] != final_step] + [(final_step, root)]


def learning_curve(params: Params, scorer_for: Callable[[Path], PyTorchScorer] | None = None) -> dict[str, Any]:
    """nDCG@10 etc. (with intervals) of every self-distillation snapshot at every exported exit.

    Step 0 is the untrained model (from ``paths.baselines`` when it holds it). Writes
    ``paths.learning_curve`` and its plot (``learning_curve.png`` beside it).
    """
    from ..serving.reranker import MatryoshkaReranker

    ev, m = params.evaluation, params.model
    queries, qrels = load_eval_set(params)
    measures = list(ev.measures)
    exits = sorted(set(params.export.exit_layers))
    pairs = [p for q in queries for p in q.pairs]
    identity = eval_identity(queries, qrels, params.data.eval_split)

    def default_scorer(adapter: Path) -> PyTorchScorer:
        reranker = MatryoshkaReranker(m.name_or_path, peft_path=[adapter], input_format=m.input_format,
                                      start_layer=m.start_layer, layer_sep=m.layer_sep, batch_size=ev.batch_size,
                                      dtype=m.torch_dtype())
        def score(ps, ks, cs):
            scores = reranker.compute_score(ps, cutoff_layers=list(ks))
            return [scores] if len(ks) == 1 else scores  # one list per exit, as PyTorchScorer says
        return score

    scorer_for = scorer_for or default_scorer
    points = []
    if not ev.learning_curve:  # off: an empty curve, so the stage costs nothing by default
        curve = {"format_version": FORMAT_VERSION, "identity": identity, "measures": measures, "points": [],
                 "note": "evaluation.learning_curve is false"}
        _write_curve(params, curve)
        return curve
    baselines = read_baselines(params, identity)
    if baselines and baselines.get("per_query"):
        for k in exits:
            name = config_name(k, 1)
            if name in baselines["per_query"]:
                points.append({"step": 0, "exit_layer": k, **baselines["summary"][name],
                               "per_query": baselines["per_query"][name]})
    for step, folder in snapshot_folders(params):
        started = time.perf_counter()
        for k, values in zip(exits, scorer_for(folder)(pairs, exits, ())):  # one list of scores per exit
            values_k = per_query(queries, scores_by_query(queries, values), qrels, measures)
            summary_k = summarise(values_k, {}, ev.confidence, ev.bootstrap_resamples)
            points.append({"step": step, "exit_layer": k, **summary_k, "per_query": values_k})
        log.info("learning curve: step %d scored in %.0f s", step, time.perf_counter() - started)
        gc.collect()
    curve = {"format_version": FORMAT_VERSION, "identity": identity, "measures": measures, "points": points}
    _write_curve(params, curve)
    return curve


def _write_curve(params: Params, curve: dict[str, Any]) -> None:
    """The curve (metrics), its flat plot data for ``dvc plots`` and a PNG beside it."""
    path = Path(params.paths.learning_curve)
    rows = [{k: v for k, v in p.items() if not isinstance(v, (dict, list))} for p in curve["points"]]
    write_json(path.with_name(path.stem + "_points.json"), rows)
    _render_curve(curve, path.with_suffix(".png"))
    write_json(path, curve)


def _render_curve(curve: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    if not curve["points"]:  # nothing to draw: an empty figure still marks the stage's output
        import matplotlib.pyplot as plt

        matplotlib.use("Agg")
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "learning curve off (evaluation.learning_curve: false)", ha="center", fontsize=8)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = curve["measures"]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    for ax, name in zip(axes[0], measures):
        for k in sorted({p["exit_layer"] for p in curve["points"]}):
            line = sorted((p for p in curve["points"] if p["exit_layer"] == k), key=lambda p: p["step"])
            xs, ys = [p["step"] for p in line], [p[name] for p in line]
            ax.errorbar(xs, ys, yerr=[np.subtract(ys, [p[f"{name}_ci"][0] for p in line]),
                                      np.subtract([p[f"{name}_ci"][1] for p in line], ys)],
                        marker="o", capsize=3, label=f"exit {k}")
        ax.set_xlabel("self-distillation step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"learning curve, {curve['identity']['queries']} queries, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_rows(per_layer_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per config: the DVC plot data (x: exit_layer or latency, y: a measure, color: ``ratio``,
    a string: "1", "2", or "1-specialist" / "1-int8" for a variant, which is a series of its own rather
    than a second point at its exit on the ratio's line)."""
    rows = [{"config": name, **{k: v for k, v in values.items() if not isinstance(v, (dict, list))}}
            for name, values in per_layer_metrics["configs"].items()]
    for row in rows:
        row["series"] = str(row["ratio"]) + (f"-{row['variant']}" if row.get("variant") else "")
    return sorted(rows, key=lambda r: (r["series"], r["exit_layer"]))


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

    configs = per_layer_metrics["configs"]
    rows = plot_rows(per_layer_metrics)
    series = sorted({r["series"] for r in rows})
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    for ax, name in zip(axes[0], measures):
        for ratio in series:
            line = sorted((r for r in rows if r["series"] == ratio), key=lambda r: r[x])
            xs, ys = [r[x] for r in line], [r[name] for r in line]
            low = [configs[r["config"]][f"{name}_ci"][0] for r in line]
            high = [configs[r["config"]][f"{name}_ci"][1] for r in line]
            ax.errorbar(xs, ys, yerr=[np.subtract(ys, low), np.subtract(high, ys)], marker="o", capsize=3,
                        label=f"ratio {ratio}")
            if x != "exit_layer":
                for r in line:
                    ax.annotate(str(r["exit_layer"]), (r[x], r[name]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        baselines = per_layer_metrics["baselines"]
        ax.axhline(baselines["bm25"][name], color="grey", linestyle="--", label="BM25")
        ax.axhline(baselines["random"][name], color="grey", linestyle=":", label="random order")
        ax.set_xlabel(x_label)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ev = per_layer_metrics["eval"]
    fig.suptitle(f"{ev['queries']} queries x {ev['candidates']} candidates, {int(ev['confidence'] * 100)}% "
                 "bootstrap intervals" + ("; points labelled by exit layer" if x != "exit_layer" else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(per_layer_metrics: dict[str, Any]) -> str:
    """A console table: one row per config (mean [interval at the eval's confidence]) plus the baselines."""
    measures = [k for k in per_layer_metrics["baselines"]["bm25"] if not k.endswith("_ci") and not k.startswith("vs_")]
    cell = lambda v, m: f"{v[m]:.3f} [{v[m + '_ci'][0]:.3f},{v[m + '_ci'][1]:.3f}]"  # noqa: E731
    header = f"{'config':>18}  " + "  ".join(f"{m:>21}" for m in measures) + f"  {'ms/query':>9}"
    lines = [header]
    for name, values in per_layer_metrics["baselines"].items():
        if name == "untrained":
            continue
        lines.append(f"{name:>18}  " + "  ".join(f"{cell(values, m):>21}" for m in measures))
    for name, v in per_layer_metrics["configs"].items():
        lines.append(f"{name:>18}  " + "  ".join(f"{cell(v, m):>21}" for m in measures)
                     + f"  {v['latency_ms_per_query']:>9.1f}")
    ev = per_layer_metrics["eval"]
    lines.append(f"{ev['queries']} queries x {ev['candidates']} candidates; "
                 f"[{100 * ev['confidence']:g}% bootstrap interval over queries]")
    check = per_layer_metrics["pytorch_check"]
    if check.get("enabled"):
        lines.append(f"PyTorch check (ratio {check['ratio']}, {check['queries']} queries): max |ORT - PyTorch| = "
                     f"{check['max_abs_diff']:.2e}, scaled by max(1, |score|) {check.get('max_scaled_diff', float('nan')):.2e} "
                     f"(tolerance {check['tolerance']:g}), rankings agree: "
                     f"{check['rankings_agree']}")
    return "\n".join(lines)
