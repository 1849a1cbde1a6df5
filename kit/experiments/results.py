"""The result table of sweeps and comparisons, in one place: its columns, building its rows from
evaluated metrics, encoding per-question outcomes and per-text losses and reading them back. Writers (kit.experiments.sweep) and
readers (kit.experiments.curves, kit.experiments.plots, kit.experiments.readings) import this module, never each other or the evaluators,
so that a saved CSV is read without loading any model code."""

import math

import numpy as np
import pandas as pd

from ..core.stats import Estimate

POINT = ("criterion", "n", "fraction", "start", "distance", "healed")  # where a sweep evaluated: the block removed
METRIC = ("metric", "value", "ci_low", "ci_high", "chance", "outcomes", "per_text")  # what it measured there
COLUMNS = POINT + METRIC  # a sweep row: one per (point, metric)
RENAMED = {"strategy": "criterion"}  # kit 0.1's names of columns: read back under today's


def _today(name: str) -> str:
    """A column's name today, also inside paired_comparison's "strategy=similarity"."""
    old, equals, value = name.partition("=")
    return RENAMED.get(old, old) + equals + value


def renamed(table):
    """A result table (a DataFrame, or rows as dicts, as a sweep cache holds them) under today's column names."""
    if isinstance(table, pd.DataFrame):
        return table.rename(columns=_today)
    return [{_today(key): value for key, value in row.items()} for row in table]


def read_csv(path, **kwargs) -> pd.DataFrame:
    """A result table saved as CSV (sweep.csv, collapse.csv, paired.csv, ...), kit 0.1's column names renamed."""
    return renamed(pd.read_csv(path, **kwargs))


def encode_outcomes(outcomes) -> str | None:
    """Per-question outcomes as one letter each, R (right) or W (wrong): compact and CSV-safe."""
    return None if outcomes is None else "".join("R" if right else "W" for right in outcomes)


def outcomes(row) -> np.ndarray:
    """The per-question outcomes (bool) of a result row, e.g. results.iloc[0]."""
    if not isinstance(row["outcomes"], str):
        raise ValueError(f"metric {row['metric']!r} has no per-question outcomes (only accuracies over questions do: mmlu, boolq, recall)")
    return np.frombuffer(row["outcomes"].encode(), dtype=np.uint8) == ord("R")


def encode_per_text(per_text) -> str | None:
    """A loss's per-text sums and token counts ([texts, 2]) as "sum:tokens" pairs, exact and CSV-safe."""
    return None if per_text is None else " ".join(f"{total!r}:{int(tokens)}" for total, tokens in np.asarray(per_text, float).tolist())


def per_text(row) -> np.ndarray:
    """The per-text sums and token counts ([texts, 2]) of a result row of a loss, e.g. results.iloc[0]."""
    if not isinstance(row["per_text"], str):
        raise ValueError(f"metric {row['metric']!r} has no per-text values (only losses over texts do: val_loss, val_loss_norm)")
    return np.array([pair.split(":") for pair in row["per_text"].split()], dtype=np.float64)


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy / torch scalars -> Python


def rows(metrics: dict[str, Estimate], **point) -> list[dict]:
    """Metrics (kit.evaluate.metrics.evaluate_all) as result rows, one per metric, each with the `point` columns
    (e.g. criterion="similarity", n=4, ...): plain Python values, JSON-able as they are."""
    point = {k: _plain(v) for k, v in point.items()}
    return [
        {**point, "metric": name, "value": _plain(e.value), "ci_low": _plain(e.low), "ci_high": _plain(e.high),
         "chance": _plain(e.chance), "outcomes": encode_outcomes(e.outcomes), "per_text": encode_per_text(e.per_text)}
        for name, e in metrics.items()
    ]  # fmt: skip


def table(metrics: dict[str, Estimate], **point) -> pd.DataFrame:
    """rows() as a DataFrame, e.g. table(metrics, n=0) for the unpruned model."""
    return pd.DataFrame(rows(metrics, **point))


def wide(metrics: dict[str, Estimate]) -> dict[str, float]:
    """Metrics as the columns of one row of a comparison (kit.experiments.sweep.compare): each metric's value, and
    its 95% interval as "{metric}_ci_low", "{metric}_ci_high" where it has one."""
    columns = {}
    for name, estimate in metrics.items():
        columns[name] = estimate.value
        if not math.isnan(estimate.low):
            columns |= {f"{name}_ci_low": estimate.low, f"{name}_ci_high": estimate.high}
    return columns


def chance_level(results: pd.DataFrame, metric: str) -> float | None:
    """The chance level of `metric` in result rows: the one its rows carry (the evaluation knows it: MMLU's
    0.25, recall's 1 / facts); None for metrics without one (losses)."""
    selected = results[results["metric"] == metric]
    levels = selected["chance"].dropna().unique() if "chance" in selected else []
    if len(levels) > 1:
        raise ValueError(f"the rows of {metric!r} carry several chance levels {sorted(levels)}: select rows of one kind")
    return float(levels[0]) if len(levels) else None
