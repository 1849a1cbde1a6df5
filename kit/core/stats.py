"""Uncertainty of the kit's estimates: 95% intervals for accuracies (Wilson, bootstrap over questions),
standard errors of means over texts, and paired differences between two models on the same questions.

Questions are scored right or wrong, so resampling n of them with replacement is a binomial draw
(a multinomial one for pairs of outcomes): the bootstraps below are exact and cost nothing per question."""

import math
import warnings
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
NAN_INTERVAL = (math.nan, math.nan)


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its 95% interval (NaN when it has none) and, for accuracies, the outcome
    (1 right, 0 wrong) of every question, what paired comparisons and resampling need, and the
    accuracy of a uniform guess (chance; NaN for metrics that have none)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    outcomes: np.ndarray | None = None
    chance: float = math.nan
    per_text: np.ndarray | None = None  # a token-weighted mean (a loss): [texts, 2] per-text sums and token counts


def side(low: float, high: float, level: float) -> str:
    """Where a 95% interval lies against `level`: "above", "below", or "contains" (a NaN interval
    contains every level: it decides nothing)."""
    return "above" if low > level else "below" if high < level else "contains"


def too_few(what: str) -> tuple[float, float]:
    """A NaN interval, with a warning saying why: never a silently zero-width one."""
    warnings.warn(f"{what}: the 95% interval is NaN", stacklevel=3)
    return NAN_INTERVAL


def wilson(successes, n, z: float = Z95):
    """Wilson score interval (low, high) for a proportion of `successes` out of `n` (95% by default);
    elementwise for arrays."""
    if np.any(np.asarray(n) < 1):
        return too_few("no questions to estimate an accuracy from")
    p = np.asarray(successes) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def subject_mean_interval(correct, subjects, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean over subjects of each subject's accuracy,
    resampling questions within each subject.

    Args:
        correct: one bool per question. subjects: the subject of each question.
    """
    correct, subjects = np.asarray(correct, bool), np.asarray(subjects)
    names, index = np.unique(subjects, return_inverse=True)
    n = np.bincount(index, minlength=len(names))
    if n.min() < 2:
        return too_few(f"subjects {names[n < 2].tolist()} have fewer than 2 questions")
    hits = np.bincount(index, weights=correct, minlength=len(names))
    rng = np.random.default_rng(seed)
    means = (rng.binomial(n, hits / n, size=(resamples, len(names))) / n).mean(axis=1)
    return tuple(float(q) for q in np.quantile(means, [0.025, 0.975]))


def paired_difference(a, b, *, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Accuracy of `a` minus accuracy of `b` on the same questions (one bool per question each),
    with a paired bootstrap 95% interval: questions are resampled together for both models."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-d arrays over the same questions, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return Estimate(float(np.mean(a) - np.mean(b)) if len(a) else math.nan, *too_few("fewer than 2 paired questions"))
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    counts = np.random.default_rng(seed).multinomial(len(a), [only_a / len(a), only_b / len(a), 1 - (only_a + only_b) / len(a)], resamples)
    low, high = np.quantile((counts[:, 0] - counts[:, 1]) / len(a), [0.025, 0.975])
    return Estimate((only_a - only_b) / len(a), float(low), float(high))


def paired_ratio_difference(a, b, *, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Token-weighted mean of `a` minus that of `b` on the same texts (each a [texts, 2] array of per-text
    sums and token counts, e.g. summed losses), with a paired bootstrap 95% interval: texts are
    resampled together for both models."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"paired per-text values must be two [texts, 2] arrays over the same texts, got {a.shape} and {b.shape}")
    if not np.array_equal(a[:, 1], b[:, 1]):
        raise ValueError("the two sides counted different tokens per text: pair evaluations of the same texts and tokenizer")
    gap, tokens = a[:, 0] - b[:, 0], a[:, 1]
    value = float(gap.sum() / tokens.sum())
    if len(gap) < 2:
        return Estimate(value, *too_few("fewer than 2 paired texts"))
    picks = np.random.default_rng(seed).integers(len(gap), size=(resamples, len(gap)))
    low, high = np.quantile(gap[picks].sum(1) / tokens[picks].sum(1), [0.025, 0.975])
    return Estimate(value, float(low), float(high))


def ratio_stderr(sums, counts) -> float:
    """Standard error over texts of a token-weighted mean sum(sums) / sum(counts) (delta method).

    Args:
        sums: per-text totals (e.g. summed loss); counts: per-text token counts.
    """
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    m = len(sums)
    if m < 2:
        warnings.warn("a standard error needs at least 2 texts: it is NaN", stacklevel=2)
        return math.nan
    ratio = sums.sum() / counts.sum()
    return float(math.sqrt(m / (m - 1) * np.sum((sums - ratio * counts) ** 2)) / counts.sum())
