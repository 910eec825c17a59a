"""The Matryoshka effects, measured: what compensation recovers, and what self-distillation adds.

* **Compensation** (``compensation_effect``): at each exported exit and ratio r > 1, the quality
  drop of width r against full width, *before* compensation (the self-distilled model alone, at
  ratio 1 and at ratio r) and *after* it (the released models: [self_distill, layer] at ratio 1,
  [self_distill, layer, token-r] at ratio r, from the evaluate stage's per-query values). Reported
  per (exit, ratio) with 95% bootstrap intervals over queries, and the fraction of the drop that
  compensation recovers (1 - drop_after / drop_before), with its interval over the same
  resampled queries. ``vs_first_stage``: every (exit, ratio) before and after compensation against
  the first stage's (BM25) order on the same queries, paired (is the re-ranker alone above BM25?).
* **Self-distillation** (``compare_runs``): the paired per-query difference between two
  self-distilled models (e.g. the cascaded ``distill_fix_layer_teacher`` against ``normal``) at
  chosen exits, from two learning-curve files computed on the same eval set.

The "before" side needs PyTorch passes over the eval set with the self-distilled adapter only (one
per ratio, every exit at once); it runs when ``evaluation.effects`` is true (off by default: the
default pipeline has no time for them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Params
from ..core.atomic import write_json
from ..serving.artifacts import config_name
from . import statistics
from .evaluation import (
    FORMAT_VERSION,
    PyTorchScorer,
    eval_identity,
    first_stage_per_query,
    load_eval_set,
    per_query,
    pytorch_scorer,
    scores_by_query,
)

log = logging.getLogger(__name__)


def _self_distilled_scorer(params: Params, ratio: int) -> PyTorchScorer:
    from ..serving.reranker import MatryoshkaReranker

    m = params.model
    reranker = MatryoshkaReranker(m.name_or_path, peft_path=[params.paths.self_distill], input_format=m.input_format,
                                  start_layer=m.start_layer, layer_sep=m.layer_sep,
                                  batch_size=params.evaluation.batch_size, dtype=m.torch_dtype())

    def score(pairs, exits, compress_layers):
        scores = reranker.compute_score(pairs, cutoff_layers=list(exits), compress_layers=compress_layers,
                                        compress_ratio=ratio)
        return [scores] if len(exits) == 1 else scores  # one list per exit, as PyTorchScorer says
    return score


def _bootstrap_recovered(before_1, before_r, after_1, after_r, resamples: int, seed: int = 0,
                         confidence: float = 0.95) -> dict[str, float]:
    """1 - drop_after / drop_before and its percentile interval (at ``confidence``), resampling queries jointly."""
    b1, br, a1, ar = (np.asarray(x, dtype=np.float64) for x in (before_1, before_r, after_1, after_r))
    drop_before, drop_after = b1 - br, a1 - ar
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b1), size=(resamples, len(b1)))
    db, da = drop_before[idx].mean(1), drop_after[idx].mean(1)
    valid = np.abs(db) > 1e-9
    ratios = 1 - da[valid] / db[valid]
    point = 1 - drop_after.mean() / drop_before.mean() if abs(drop_before.mean()) > 1e-9 else float("nan")
    tail = 50 * (1 - confidence)
    low, high = (np.percentile(ratios, [tail, 100 - tail]) if valid.any() else (float("nan"), float("nan")))
    return {"recovered": round(float(point), 4), "recovered_ci": [round(float(low), 4), round(float(high), 4)]}


def _score_by_exit(score, queries, qrels, measure: str, exits: list[int], compress) -> dict[int, dict[str, float]]:
    """One pass of ``score`` over every eval pair, all exits at once -> {exit: {query id: measure}}."""
    pairs = [p for q in queries for p in q.pairs]
    result = {}
    for k, values in zip(exits, score(pairs, exits, compress)):  # one list of scores per exit
        result[k] = per_query(queries, scores_by_query(queries, values), qrels, [measure])[measure]
    return result


def compensation_effect(params: Params, scorer_for=None, after_from: str = "evaluate") -> dict[str, Any]:
    """Writes ``paths.effects`` (JSON) and returns it; see the module docstring.

    ``after_from``: "evaluate" reads the compensated models' per-query values from the evaluate
    stage (``paths.per_query``, the exported ONNX models: no extra pass); "pytorch" scores the
    compensated PyTorch models here instead (one pass per ratio), for experiments that stop before
    export (``matryoshka effects --after-from pytorch``).
    """
    ev = params.evaluation
    if after_from not in ("evaluate", "pytorch"):
        raise ValueError(f"after_from must be 'evaluate' or 'pytorch', got {after_from!r}")
    if not ev.effects:
        result = {"format_version": FORMAT_VERSION, "compensation": [], "note": "evaluation.effects is false"}
        write_json(params.paths.effects, result)
        return result
    queries, qrels = load_eval_set(params)
    identity = eval_identity(queries, qrels, params.data.eval_split)
    measure = ev.measures[0]
    exits = sorted(set(params.export.exit_layers))
    ratios = sorted(set(params.export.ratios))
    if after_from == "evaluate":
        stored = json.loads(Path(params.paths.per_query).read_text())
        if stored.get("identity") != identity:
            raise ValueError(f"{params.paths.per_query} was computed on another eval set; run evaluate first")
        after = {(k, r): stored["systems"][config_name(k, r)][measure] for k in exits for r in ratios}
    else:
        after = {}
        for ratio in ratios:
            compress = tuple(params.compression.layers) if ratio > 1 else ()
            for k, values in _score_by_exit(pytorch_scorer(params, ratio), queries, qrels, measure, exits,
                                            compress).items():
                after[(k, ratio)] = values
            log.info("effects: compensated model scored at ratio %d", ratio)
    scorer_for = scorer_for or (lambda ratio: _self_distilled_scorer(params, ratio))
    before: dict[tuple[int, int], dict[str, float]] = {}
    for ratio in ratios:
        compress = tuple(params.compression.layers) if ratio > 1 else ()
        for k, values in _score_by_exit(scorer_for(ratio), queries, qrels, measure, exits, compress).items():
            before[(k, ratio)] = values
        log.info("effects: self-distilled model scored at ratio %d", ratio)
    ids = sorted(qrels)
    rows = []
    for ratio in [r for r in ratios if r > 1]:
        for k in exits:
            b1 = [before[(k, 1)][q] for q in ids]
            br = [before[(k, ratio)][q] for q in ids]
            a1 = [after[(k, 1)][q] for q in ids]
            ar = [after[(k, ratio)][q] for q in ids]
            drop_before = statistics.paired_difference(b1, br, ev.confidence, ev.bootstrap_resamples)
            drop_after = statistics.paired_difference(a1, ar, ev.confidence, ev.bootstrap_resamples)
            rows.append({"exit_layer": k, "ratio": ratio, "measure": measure,
                         "before": {"ratio_1": round(float(np.mean(b1)), 4), f"ratio_{ratio}": round(float(np.mean(br)), 4),
                                    "drop": drop_before.to_dict()},
                         "after": {"ratio_1": round(float(np.mean(a1)), 4), f"ratio_{ratio}": round(float(np.mean(ar)), 4),
                                   "drop": drop_after.to_dict()},
                         **_bootstrap_recovered(b1, br, a1, ar, ev.bootstrap_resamples, confidence=ev.confidence)})
    # Is the released model above the first stage on its own? The same queries' BM25 order, paired.
    bm25 = first_stage_per_query(queries, qrels, [measure])[measure]
    b = [bm25[q] for q in ids]
    vs_first_stage = [{"exit_layer": k, "ratio": r, "measure": measure, "bm25": round(float(np.mean(b)), 4),
                       "before": statistics.paired_difference([before[(k, r)][q] for q in ids], b, ev.confidence,
                                                              ev.bootstrap_resamples).to_dict(),
                       "after": statistics.paired_difference([after[(k, r)][q] for q in ids], b, ev.confidence,
                                                             ev.bootstrap_resamples).to_dict()}
                      for r in ratios for k in exits]
    result = {"format_version": FORMAT_VERSION, "identity": identity, "measure": measure, "after_from": after_from,
              "compensation": rows, "vs_first_stage": vs_first_stage,
              "self_distilled": {config_name(k, r): float(np.mean([before[(k, r)][q] for q in ids]))
                                 for (k, r) in before}}
    write_json(params.paths.effects, result)
    return result


def compare_runs(curve_a: dict[str, Any], curve_b: dict[str, Any], exits: list[int], measure: str = "nDCG@10",
                 confidence: float = 0.95, resamples: int = 10_000) -> list[dict[str, Any]]:
    """Paired difference a - b at each exit, between the final points of two learning curves."""
    if curve_a["identity"] != curve_b["identity"]:
        raise ValueError("the two learning curves were computed on different eval sets")

    def final(curve, k):
        points = [p for p in curve["points"] if p["exit_layer"] == k and "per_query" in p]
        if not points:
            raise ValueError(f"no per-query values at exit {k} in the learning curve")
        return max(points, key=lambda p: p["step"])["per_query"][measure]

    rows = []
    for k in exits:
        a, b = statistics.aligned(final(curve_a, k), final(curve_b, k))
        diff = statistics.paired_difference(a, b, confidence, resamples)
        rows.append({"exit_layer": k, "measure": measure, "a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4),
                     "difference": diff.to_dict()})
    return rows
