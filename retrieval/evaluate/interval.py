"""Estimating mAP from a random sample of queries: the sample, and 95% bootstrap intervals.

Every candidate is still ranked; only the queries are sampled. The interval of a group's mAP is
the 2.5th-97.5th percentile of its mean AP over ``RESAMPLES`` resamples of the sampled queries
drawn with replacement (percentile bootstrap); the interval of a view's mean over groups comes
from the same resamples, so the groups' shared queries are accounted for. It ignores the finite
population correction, so it is conservative when the sample is a large part of the split.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
VARIANTS = ("map_paper", "map_standard")


def draw_queries(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct rows of ``n`` drawn at random (seeded), ascending; all rows when size >= n."""
    if size < 1:
        raise ValueError(f"the query sample must hold at least 1 query, got {size}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def resampled_means(series: dict, n: int, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """{key: [resamples] bootstrap means} of per-query values ``series[key] = (positions, values)``,
    positions in 0..n-1; NaN where a resample drew none of a series' queries."""
    rng = np.random.default_rng(seed)
    values, member = np.zeros((n, len(series))), np.zeros((n, len(series)))
    for s, (positions, v) in enumerate(series.values()):
        values[positions, s], member[positions, s] = v, 1.0
    sums, counts = [], []
    step = max(1, 2**22 // max(n, 1))  # resamples at a time: their weights take 8 x step x n bytes
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        draws = rng.integers(0, n, (b, n)) + n * np.arange(b)[:, None]  # b resamples of n queries each
        weights = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        sums.append(weights @ values)
        counts.append(weights @ member)
    sums, counts = np.concatenate(sums), np.concatenate(counts)
    means = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    return {key: means[:, s] for s, key in enumerate(series)}


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """[low, high] percentile interval of bootstrap replicates (None when all are undefined)."""
    if np.isnan(replicates).all():
        return None
    low, high = np.nanquantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def add_intervals(groups: dict, views: dict, aps: dict, n: int, seed: int = 0) -> None:
    """Add ``ci95`` {variant: [low, high]} to each group's entries and to each view's mean.

    Args:
        groups: the report's groups (``group_view`` entries included), updated in place.
        views: the report's views ({"shared": ..., "group": ...}), updated in place.
        aps: {(view, group): (positions, paper APs, standard APs)} of ``metrics.rank_views``;
            the shared view's key is None.
        n: the number of sampled queries.
    """
    series = {(view, g, variant): (positions, values) for (view, g), (positions, *ap) in aps.items()
              for variant, values in zip(VARIANTS, ap)}
    reps = resampled_means(series, n, seed)
    for (view, g, variant), replicates in reps.items():
        entry = groups[g] if view is None else groups[g]["group_view"]
        entry.setdefault("ci95", {})[variant] = percentile_interval(replicates)
    for name, mean in views.items():
        if mean["groups"]:
            keys = [(None if name == "shared" else g, g) for g in mean["groups"]]
            mean["ci95"] = {variant: percentile_interval(np.mean([reps[(*key, variant)] for key in keys], axis=0))
                            for variant in VARIANTS}
