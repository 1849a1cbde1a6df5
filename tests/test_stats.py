"""Intervals against their closed forms, and the bootstraps' coverage on simulated data with a known answer."""

import math

import numpy as np
import pytest

from kit.core import stats
from kit.core.stats import Estimate, side

RUNS = 1000  # simulated samples per coverage check: a 95% interval should cover the truth in 93-97% of them


def test_wilson_matches_the_closed_form():
    z = 1.959963984540054
    for k, n in [(0, 10), (3, 10), (10, 10), (29, 48), (7000, 14042)]:
        p = k / n
        centre = (k + z**2 / 2) / (n + z**2)
        half = z * math.sqrt(n) / (n + z**2) * math.sqrt(p * (1 - p) + z**2 / (4 * n))
        assert stats.wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    low, high = stats.wilson(0, 10)
    assert low == pytest.approx(0, abs=1e-15) and high > 0.2  # never zero-width, even at 0 of 10


def test_subject_mean_interval_covers_the_truth():
    rng = np.random.default_rng(0)
    p, n = np.array([0.3, 0.5, 0.6, 0.85]), np.array([40, 60, 25, 50])
    subjects = np.repeat(np.arange(4), n)
    covered = 0
    for run in range(RUNS):
        correct = rng.random(n.sum()) < p[subjects]
        low, high = stats.subject_mean_interval(correct, subjects, resamples=1000, seed=run)
        covered += low <= p.mean() <= high
    assert 0.93 <= covered / RUNS <= 0.97


def test_subject_mean_interval_resamples_within_subjects():
    subjects = ["a"] * 4 + ["b"] * 100
    correct = [True, True, True, True] + [True] * 50 + [False] * 50
    low, high = stats.subject_mean_interval(correct, subjects)
    assert low < 0.75 < high and high - low < 0.11  # subject a (all right) adds no spread; b alone spans about +-0.05


def test_paired_difference_covers_the_truth():
    rng = np.random.default_rng(1)
    covered = 0
    for run in range(RUNS):
        skill = rng.random(150)
        a, b = skill < 0.6, skill < 0.5  # strongly correlated models; true difference 0.1
        b ^= rng.random(150) < 0.1
        truth = 0.6 - (0.5 * 0.9 + 0.5 * 0.1)
        estimate = stats.paired_difference(a, b, resamples=1000, seed=run)
        covered += estimate.low <= truth <= estimate.high
    assert 0.93 <= covered / RUNS <= 0.97


def test_paired_difference_is_narrower_than_unpaired():
    rng = np.random.default_rng(2)
    a = rng.random(400) < 0.6
    b = a.copy()
    b[:20] = ~b[:20]
    estimate = stats.paired_difference(a, b)
    assert estimate.value == pytest.approx(a.mean() - b.mean())
    assert estimate.high - estimate.low < 0.05  # unpaired Wilson intervals are each about 0.1 wide


def test_paired_ratio_difference_covers_the_truth_and_cancels_what_both_share():
    rng = np.random.default_rng(4)
    tokens = rng.integers(20, 200, size=(60, 1)).astype(float)
    covered = 0
    for run in range(RUNS):
        text_hardness = rng.normal(3.0, 0.5, size=(60, 1))  # shared by both models: cancels in the pair
        a = np.hstack([(text_hardness + 0.05 + rng.normal(0, 0.02, (60, 1))) * tokens, tokens])
        b = np.hstack([(text_hardness + rng.normal(0, 0.02, (60, 1))) * tokens, tokens])
        estimate = stats.paired_ratio_difference(a, b, resamples=1000, seed=run)
        assert estimate.value == pytest.approx(a[:, 0].sum() / tokens.sum() - b[:, 0].sum() / tokens.sum())
        covered += estimate.low <= 0.05 <= estimate.high
        assert estimate.high - estimate.low < 0.03  # each model's own 95% interval over texts is about 0.25 wide
    assert 0.93 <= covered / RUNS <= 0.97
    with pytest.raises(ValueError, match="counted different tokens per text"):
        stats.paired_ratio_difference(a, b + [0, 1])
    with pytest.raises(ValueError, match=r"two \[texts, 2\] arrays over the same texts"):
        stats.paired_ratio_difference(a, b[:5])


def test_ratio_stderr_is_the_standard_error_of_a_mean_for_unit_counts():
    values = np.random.default_rng(3).random(30)
    assert stats.ratio_stderr(values, np.ones(30)) == pytest.approx(values.std(ddof=1) / math.sqrt(30))


def test_too_few_data_give_nan_intervals_with_a_warning():
    with pytest.warns(UserWarning, match="no questions"):
        assert all(math.isnan(x) for x in stats.wilson(0, 0))
    with pytest.warns(UserWarning, match=r"subjects \['b'\] have fewer than 2 questions"):
        assert all(math.isnan(x) for x in stats.subject_mean_interval([True, False, True], ["a", "a", "b"]))
    with pytest.warns(UserWarning, match="fewer than 2 paired questions"):
        estimate = stats.paired_difference([True], [False])
    assert estimate.value == 1 and math.isnan(estimate.low) and math.isnan(estimate.high)
    with pytest.warns(UserWarning, match="at least 2 texts"):
        assert math.isnan(stats.ratio_stderr([1.0], [3]))
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_difference([True, False], [True])


def test_side_places_an_interval_against_a_level():
    assert [side(0.3, 0.4, 0.25), side(0.1, 0.2, 0.25), side(0.2, 0.3, 0.25), side(0.25, 0.3, 0.25)] == ["above", "below", "contains", "contains"]
    assert side(math.nan, math.nan, 0.25) == "contains"  # no interval decides nothing


def test_above_chance_decides_unless_forced():
    from kit.evaluate.metrics import above_chance

    above, at = Estimate(0.5, 0.3, 0.7, chance=0.25), Estimate(0.3, 0.2, 0.4, chance=0.25)
    assert above_chance(above) and not above_chance(at)
    assert above_chance(at, force=True) and not above_chance(above, force=False)
