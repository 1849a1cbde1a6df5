"""The result table: rows built from metrics, outcomes encoded and read back, chance levels, and the
old homes of these names still working (with a warning) for one release."""

import math

import numpy as np
import pandas as pd
import pytest

from kit.core.stats import Estimate
from kit.experiments import results


def test_rows_are_one_per_metric_with_the_point_columns():
    table = results.table({"mmlu": Estimate(0.5, 0.2, 0.8, np.array([True, False]), 0.25), "parameters": Estimate(7.0)}, n=0)
    assert table["metric"].tolist() == ["mmlu", "parameters"] and table["n"].tolist() == [0, 0]
    assert table.loc[0, ["value", "ci_low", "ci_high", "chance", "outcomes"]].tolist() == [0.5, 0.2, 0.8, 0.25, "RW"]
    assert pd.isna(table.loc[1, "outcomes"]) and pd.isna(table.loc[1, "per_text"]) and math.isnan(table.loc[1, "chance"])
    point = dict(criterion="similarity", n=np.int64(4), fraction=0.5, start=2, distance=np.float32(0.25), healed=False)
    row = results.rows({"recall": Estimate(1.0)}, **point)[0]
    assert tuple(row) == results.COLUMNS and type(row["n"]) is int and type(row["distance"]) is float  # JSON-able


def test_outcomes_survive_a_csv_round_trip(tmp_path):
    right = np.random.default_rng(0).random(97) < 0.4
    table = results.table({"mmlu": Estimate(right.mean(), outcomes=right, chance=0.25), "val_loss": Estimate(2.5)}, n=0)
    table.to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv")
    assert results.outcomes(back.iloc[0]).tolist() == right.tolist()
    with pytest.raises(ValueError, match="'val_loss' has no per-question outcomes"):
        results.outcomes(back.iloc[1])
    assert results.encode_outcomes(None) is None and results.encode_outcomes([]) == ""


def test_per_text_losses_survive_a_csv_round_trip_exactly(tmp_path):
    per_text = np.stack([np.random.default_rng(1).random(13) * 50, np.arange(13) + 3], axis=1)
    table = results.table({"val_loss": Estimate(per_text[:, 0].sum() / per_text[:, 1].sum(), per_text=per_text),
                           "mmlu": Estimate(0.5, outcomes=np.array([True, False]))}, n=0)  # fmt: skip
    table.to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv")
    assert np.array_equal(results.per_text(back.iloc[0]), per_text)  # floats written by repr: bit-exact
    with pytest.raises(ValueError, match="'mmlu' has no per-text values"):
        results.per_text(back.iloc[1])


def test_chance_level_is_the_one_the_rows_carry():
    rows = [dict(metric="recall", chance=1 / 6), dict(metric="mmlu", chance=math.nan), dict(metric="val_loss", chance=math.nan)]
    table = pd.DataFrame(rows)
    assert results.chance_level(table, "recall") == 1 / 6
    assert results.chance_level(table, "mmlu") is None  # rows without one: the reader does not guess
    assert results.chance_level(table, "val_loss") is None
    mixed = pd.concat([table, pd.DataFrame([dict(metric="recall", chance=0.25)])])
    with pytest.raises(ValueError, match="several chance levels"):
        results.chance_level(mixed, "recall")


def test_wide_puts_each_interval_beside_its_value():
    assert results.wide({"a": Estimate(1.0, 0.5, 1.5), "b": Estimate(2.0)}) == {"a": 1.0, "a_ci_low": 0.5, "a_ci_high": 1.5, "b": 2.0}
