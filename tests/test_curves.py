"""Reading sweep tables: collapse points against known transitions, paired comparisons against the
stats module's paired bootstrap, per-criterion collapse points and healing gains."""

import math

import numpy as np
import pandas as pd
import pytest

from kit.core import stats
from kit.core.stats import Estimate
from kit.experiments import curves, results


def _curve(accuracies, questions, seed=0, criterion="similarity"):
    """A synthetic MMLU sweep over n = 0..len-1 of 10 layers with the given true accuracies."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, p in enumerate(accuracies):
        right = rng.random(questions) < p
        rows.append(dict(criterion=criterion, n=n, fraction=n / 10, healed=False, metric="mmlu", value=right.mean(), chance=0.25,
                         outcomes="".join("R" if r else "W" for r in right)))  # fmt: skip
    return pd.DataFrame(rows)


def test_collapse_point_finds_a_known_transition():
    sharp = [0.7] * 4 + [0.25] * 6  # collapses to chance at n = 4 of 10
    assert curves.collapse_point(_curve(sharp, questions=2000)) == (0.4, (0.4, 0.4))
    fraction, (low, high) = curves.collapse_point(_curve(sharp, questions=400))
    assert fraction == 0.4 and low == 0.4 and 0.4 < high <= 0.6  # fewer questions: a point at chance may look above it
    gradual = _curve([0.7, 0.6, 0.5, 0.4, 0.3, 0.28, 0.26, 0.25, 0.25, 0.25], questions=100, seed=1)
    fraction, (low, high) = curves.collapse_point(gradual)
    assert low <= fraction <= high and 0.3 <= fraction <= 0.7 and high > low  # a real spread of plausible points
    assert curves.collapse_point(_curve([0.7] * 10, questions=200)) == (math.inf, (math.inf, math.inf))
    at_chance = _curve([0.3] * 10, questions=40)  # a small model: indistinguishable from chance unpruned
    assert curves.collapse_point(at_chance)[0] == 0.0


def test_collapse_point_bad_input():
    two = pd.concat([_curve([0.7, 0.3], 20), _curve([0.7, 0.3], 20, criterion="heuristic")])
    with pytest.raises(ValueError, match="several curves"):
        curves.collapse_point(two)
    with pytest.raises(ValueError, match="no chance level known for 'acc'"):
        curves.collapse_point(_curve([0.7, 0.3], 20).assign(metric="acc", chance=math.nan), metric="acc")
    with pytest.raises(ValueError, match="metrics present: \\['mmlu'\\]"):
        curves.collapse_point(two, metric="boolq")


def test_paired_comparison_of_two_criteria():
    a, b = _curve([0.7, 0.6, 0.5], 300, seed=2), _curve([0.7, 0.4, 0.3], 300, seed=3, criterion="heuristic")
    table = curves.paired_comparison(pd.concat([a, b]), "criterion", "similarity", "heuristic")
    assert list(table.columns) == ["n", "fraction", "criterion=similarity", "criterion=heuristic", "difference", "ci_low", "ci_high"]
    for n, row in table.iterrows():
        right_a, right_b = results.outcomes(a.iloc[n]), results.outcomes(b.iloc[n])
        expected = stats.paired_difference(right_a, right_b)
        assert row.difference == pytest.approx(right_a.mean() - right_b.mean())
        assert (row.ci_low, row.ci_high) == (expected.low, expected.high)
    assert table.ci_low.iloc[2] > 0.1  # similarity is clearly better at n = 2
    with pytest.raises(ValueError, match="no n has 'mmlu' rows for both criterion='similarity' and criterion='random'"):
        curves.paired_comparison(pd.concat([a, b]), "criterion", "similarity", "random")


def test_collapse_points_and_healing_gains_per_criterion():
    a = _curve([0.7, 0.7, 0.25, 0.25], 400, seed=4)
    b = _curve([0.7, 0.25, 0.25, 0.25], 400, seed=5, criterion="heuristic")
    healed = _curve([0.7, 0.7, 0.7, 0.25], 400, seed=6).query("n == 2").assign(healed=True)
    results = pd.concat([a, b, healed], ignore_index=True)
    table = curves.collapse_points(results)
    assert table["criterion"].tolist() == ["similarity", "heuristic"]
    for criterion, curve in (("similarity", a), ("heuristic", b)):
        fraction, (low, high) = curves.collapse_point(curve)
        assert table.set_index("criterion").loc[criterion, ["collapse", "ci_low", "ci_high"]].tolist() == [fraction, low, high]
    gains = curves.healing_gains(results)
    expected = curves.paired_comparison(pd.concat([a, healed]), "healed", True, False)
    assert gains["criterion"].tolist() == ["similarity"]
    pd.testing.assert_frame_equal(gains.drop(columns="criterion"), expected)
    with pytest.raises(ValueError, match="no healed rows"):
        curves.healing_gains(pd.concat([a, b]))


def test_by_metric_stacks_one_table_per_metric():
    mmlu = _curve([0.7, 0.7, 0.25], 200, seed=7)
    recall = _curve([0.9, 0.3, 0.3], 200, seed=8).assign(metric="recall", chance=0.25)
    both = pd.concat([mmlu, recall], ignore_index=True)
    table = curves.by_metric(curves.collapse_points, both, ["recall", "mmlu"])
    assert table["metric"].tolist() == ["recall", "mmlu"]
    assert table["collapse"].tolist() == [curves.collapse_point(recall, "recall")[0], curves.collapse_point(mmlu, "mmlu")[0]]


def test_paired_comparison_of_losses_pairs_the_same_texts():
    rng = np.random.default_rng(5)
    tokens = rng.integers(10, 50, size=30).astype(float)
    hard = rng.normal(3, 0.4, size=30)
    sums = {"similarity": (hard + 0.1) * tokens, "heuristic": (hard + 0.3 + rng.normal(0, 0.05, 30)) * tokens}
    table = pd.concat([
        results.table({"val_loss": Estimate(s.sum() / tokens.sum(), per_text=np.stack([s, tokens], 1))},
                      criterion=criterion, n=2, fraction=0.25)
        for criterion, s in sums.items()
    ])  # fmt: skip
    row = curves.paired_comparison(table, "criterion", "similarity", "heuristic", metric="val_loss").iloc[0]
    expected = stats.paired_ratio_difference(*(np.stack([s, tokens], 1) for s in sums.values()))
    assert row.difference == pytest.approx(row["criterion=similarity"] - row["criterion=heuristic"])
    assert (row.difference, row.ci_low, row.ci_high) == (expected.value, expected.low, expected.high)
    assert row.ci_high < 0  # about -0.2 +- 0.02: far clearer than either loss's own interval (+-0.15)
