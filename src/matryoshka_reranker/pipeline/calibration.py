"""Calibrated scores across exits: Platt scaling per (exit, ratio), fitted at export, checked at evaluation.

Raw scores of different exits live on different scales (a shallow head's logits are not a deep
head's), so a threshold or a probability read off one exit means nothing at another (FlagEmbedding
#1077). At export, each configuration gets ``p = sigmoid(a * score + b)`` fitted by logistic
regression on a *calibration half* of the eval queries (chosen by a hash of the query id, so the
split is stable however the eval set is sampled); the evaluate stage reports the expected
calibration error (ECE, 10 equal-width bins) of ``sigmoid(score)`` and of the calibrated
probability on the *other* half only. Rankings are unchanged by the monotone map, so the quality
metrics over all eval queries are unaffected by which queries calibrated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def in_calibration_half(query_id: str) -> bool:
    return int(hashlib.sha256(str(query_id).encode()).hexdigest(), 16) % 2 == 0


@dataclass(frozen=True)
class CalibrationSet:
    """Labelled pairs from the calibration half of the eval queries."""

    query_ids: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    labels: tuple[int, ...]  # 1 = judged relevant


def calibration_set(queries, qrels: dict[str, dict[str, int]], limit: int) -> CalibrationSet | None:
    """Up to ``limit`` calibration-half queries with their candidates and binary labels."""
    chosen = [q for q in queries if in_calibration_half(q.query_id) and q.query_id in qrels][:limit]
    if not chosen:
        return None
    pairs, labels = [], []
    for q in chosen:
        for c in q.candidates:
            pairs.append((q.query, c.text))
            labels.append(int(qrels[q.query_id].get(c.doc_id, 0) > 0))
    return CalibrationSet(tuple(q.query_id for q in chosen), tuple(pairs), tuple(labels))


def fit_platt(scores: Sequence[float], labels: Sequence[int]) -> dict:
    """(a, b) minimising the log loss of sigmoid(a * s + b), with Platt's smoothed targets."""
    from scipy.optimize import minimize

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    positives, negatives = y.sum(), len(y) - y.sum()
    if positives == 0 or negatives == 0:
        return {"method": "none", "a": 1.0, "b": 0.0, "pairs": len(y), "positives": int(positives),
                "note": "the calibration pairs hold one class only: identity (plain sigmoid)"}
    target = np.where(y > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))  # Platt (1999)
    center, scale = float(np.mean(s)), float(np.std(s))
    if not scale > 0:
        return {"method": "none", "a": 1.0, "b": 0.0, "pairs": len(y), "positives": int(positives),
                "note": "the exit gives every calibration pair the same score: identity (plain sigmoid)"}

    def loss(params):  # standardised scores: the fit is as well conditioned at any offset and spread
        z = params[0] * (s - center) / scale + params[1]
        return float(np.sum(np.logaddexp(0, z) - target * z))

    # The slope is held at a small positive floor: a falling map would reverse the ranking of normalize=True
    # against the raw scores, and the identity would be far off for large logits (ECE 0.69 at one default exit).
    # At the floor the probability is about the calibration pairs' base rate and still rises with the score.
    result = minimize(loss, x0=np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(MIN_SLOPE, None), (None, None)])
    a = float(result.x[0] / scale)
    b = float(result.x[1] - a * center)
    fitted = {"method": "platt", "a": a, "b": b, "pairs": len(y), "positives": int(positives)}
    if result.x[0] <= MIN_SLOPE * (1 + 1e-6):
        fitted["note"] = ("the exit's scores do not rise with relevance on the calibration pairs: slope held at "
                          "its floor (about the base rate, order kept)")
    return fitted


MIN_SLOPE = 1e-3  # per standard deviation of the calibration scores


def expected_calibration_error(probabilities: Sequence[float], labels: Sequence[int], bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width probability bins."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(y[members].mean() - p[members].mean())
    return float(error)
