"""Confidence intervals and paired tests over queries (scipy), as an IR reviewer expects them.

Quality is a mean over queries, and per-query nDCG@10 varies a lot (sd ~0.3 on SciFact), so every
mean comes with a 95% bootstrap interval over queries, and every comparison of two systems on the
same queries is *paired*: the interval of the mean per-query difference, and a two-sided
sign-flip permutation test of it. Resampling is seeded, so reports are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedDifference:
    """a - b over the same queries."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] (p={self.p_value:.3g})"


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("need a non-empty 1-D list of per-query values")
    if not np.isfinite(array).all():
        raise ValueError("per-query values must be finite")
    return array


def mean_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> Interval:
    """Mean and its percentile-bootstrap interval over queries."""
    from scipy import stats

    x = _values(values)
    if x.size < 2 or np.ptp(x) == 0:
        return Interval(float(x.mean()), float(x.mean()), float(x.mean()), int(x.size))
    result = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return Interval(float(x.mean()), float(result.confidence_interval.low), float(result.confidence_interval.high),
                    int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      alternative: str = "two-sided") -> PairedDifference:
    """Mean of ``a - b`` per query, its bootstrap interval, and a sign-flip permutation p-value.

    ``alternative`` is scipy's: "two-sided" for "do they differ?", "less" (a < b) or "greater" for
    a question with a direction, such as the release gate's "did it get worse?".
    """
    from scipy import stats

    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same queries: {x.size} vs {y.size}")
    d = x - y
    if np.all(d == 0):
        return PairedDifference(0.0, 0.0, 0.0, 1.0, int(d.size))
    interval = mean_interval(d, confidence, resamples, seed)
    test = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative=alternative,
                                  n_resamples=resamples, rng=np.random.default_rng(seed), vectorized=True)
    return PairedDifference(interval.mean, interval.low, interval.high, float(test.pvalue), int(d.size))


def aligned(per_query_a: Mapping[str, float], per_query_b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Two per-query dicts as arrays over the same query ids; a query missing from either is an error."""
    if set(per_query_a) != set(per_query_b):
        missing = sorted(set(per_query_a) ^ set(per_query_b))
        raise ValueError(f"per-query values cover different queries (e.g. {missing[:5]})")
    ids = sorted(per_query_a)
    return (np.array([per_query_a[q] for q in ids], dtype=np.float64),
            np.array([per_query_b[q] for q in ids], dtype=np.float64))
