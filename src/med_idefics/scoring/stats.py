"""Uncertainty for evaluation means: percentile-bootstrap confidence intervals, the paired bootstrap of a difference,
and the exact McNemar test. Thin, seeded wrappers over scipy so every number in a report is reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE_LEVEL = 0.95
ALPHA = 1 - CONFIDENCE_LEVEL


def bootstrap_ci(values: Sequence[float], seed: int, resamples: int) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the mean; None for no values, the value itself for one.

    Percentile rather than BCa: BCa is undefined on constant samples (an all-correct closed subset is common).
    """
    sample = np.asarray(values, dtype=float)
    if sample.size == 0:
        return None
    if sample.size == 1:
        return float(sample[0]), float(sample[0])
    result = stats.bootstrap(
        (sample,),
        np.mean,
        n_resamples=resamples,
        confidence_level=CONFIDENCE_LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_bootstrap_ci(
    values_a: Sequence[float], values_b: Sequence[float], seed: int, resamples: int
) -> tuple[float, float] | None:
    """95 % paired-bootstrap interval of mean(b) - mean(a): questions are resampled, the same indices for both."""
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        return None
    if a.size == 1:
        return float(b[0] - a[0]), float(b[0] - a[0])
    result = stats.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=CONFIDENCE_LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar_p(correct_a: Sequence[bool], correct_b: Sequence[bool], alternative: str = "two-sided") -> float | None:
    """Exact McNemar p-value from the discordant pairs: 1.0 when there are none, None for no pairs. ``alternative``
    ``greater``: one-sided, b right more often than a (scipy's binomial test on b's share of the discordant pairs)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        return None
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_b, only_a + only_b, p=0.5, alternative=alternative).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values, in their order (None stays None and is not counted): the
    family-wise error stays at the nominal level whichever of the hypotheses are true. (statsmodels'
    ``multipletests(method="holm")`` gives the same; it is not a dependency for these five lines.)"""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[index] = running
    return adjusted
