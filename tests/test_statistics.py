"""pipeline/statistics.py: the bootstrap interval and the paired sign-flip test every quality claim and the release
gate rest on, checked against values derived by hand."""

from __future__ import annotations

import pytest

from matryoshka_reranker.pipeline import statistics


def test_bootstrap_interval_is_the_percentile_interval_at_the_confidence_asked():
    """50 zeros and 50 ones: the bootstrap mean is Binomial(100, 1/2) / 100, whose 2.5% / 97.5% quantiles are
    0.40 / 0.60 (5% / 95%: 0.42 / 0.58). A 95% interval taken at other percentiles (e.g. 97.5% passed as the
    confidence) would be 0.39 / 0.61."""
    values = [0.0] * 50 + [1.0] * 50
    interval = statistics.mean_interval(values)
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx((0.5, 0.40, 0.60, 100), abs=0.005)
    ninety = statistics.mean_interval(values, confidence=0.9)
    assert (ninety.low, ninety.high) == pytest.approx((0.42, 0.58), abs=0.005)
    paired = statistics.paired_difference(values, [0.0] * 100)  # a - b: the same interval
    assert (paired.mean, paired.low, paired.high) == pytest.approx((0.5, 0.40, 0.60), abs=0.005)


def test_paired_values_are_aligned_by_query_id_not_by_position():
    """Two systems' per-query dicts list their queries in different orders: each query's values must be paired
    with each other (here the differences are all +0.1, so the interval is a point), whatever the dict order."""
    a = {"q1": 0.9, "q2": 0.5, "q3": 0.1, "q4": 0.7}
    b = {"q3": 0.0, "q4": 0.6, "q1": 0.8, "q2": 0.4}
    x, y = statistics.aligned(a, b)
    assert list(x - y) == pytest.approx([0.1] * 4)
    assert {q: v for q, v in zip(sorted(a), x)} == a
    difference = statistics.paired_difference(x, y)
    assert (difference.mean, difference.low, difference.high) == pytest.approx((0.1, 0.1, 0.1), abs=1e-9)
    assert difference.p_value == pytest.approx(0.125, abs=1e-9)  # 4 queries, all +: 2 of 16 sign flips as extreme
    with pytest.raises(ValueError, match="different queries"):
        statistics.aligned(a, {**b, "q5": 0.0})
