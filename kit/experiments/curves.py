"""Reading a sweep's table (kit.experiments.sweep): per-question outcomes, paired differences between two
curves, where a curve reaches chance (the paper's collapse point), and what healing gains."""

import math

import numpy as np
import pandas as pd

from ..core.stats import paired_difference, paired_ratio_difference, wilson
from . import results as _results

LABELS = {  # each metric in words, with its unit: the figures' axes and the readings
    "recall": "in-context recall (accuracy)", "mmlu": "MMLU accuracy", "mmlu_subjects": "MMLU accuracy, mean over subjects",
    "boolq": "BoolQ accuracy", "val_loss": "validation loss (nats per token)",
    "val_loss_norm": "validation loss / log(vocabulary size)", "parameters": "parameters", "weight_bytes": "weight bytes",
    "kv_bytes_per_token": "KV-cache bytes per token", "prefill_tokens_per_s": "prefill speed (tokens/s)",
    "decode_tokens_per_s": "decode speed (tokens/s)", "time_to_first_token_s": "time to first token (s)",
    "peak_memory_bytes": "peak memory (bytes)",
}  # fmt: skip


def paired(row_a, row_b, **bootstrap):
    """a minus b on the same questions (accuracies) or the same texts (losses), with its paired interval."""
    if isinstance(row_a.get("per_text"), str):
        return paired_ratio_difference(_results.per_text(row_a), _results.per_text(row_b), **bootstrap)
    return paired_difference(_results.outcomes(row_a), _results.outcomes(row_b), **bootstrap)


def paired_comparison(results: pd.DataFrame, by: str, a, b, *, metric: str = "mmlu", resamples: int = 2000,
                      seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """For every n evaluated both ways, `metric` where results[by] == a minus where it is b, on the
    same questions (accuracies) or texts (losses), with a paired bootstrap 95% interval (questions or
    texts resampled together for both).

    E.g. paired_comparison(results, "criterion", "similarity", "heuristic") or
    paired_comparison(healed, "healed", True, False). Returns one row per n: n, fraction,
    "{by}={a}", "{by}={b}", difference, ci_low, ci_high.
    """
    rows = results[results["metric"] == metric]
    table = []
    for n, group in rows.groupby("n", sort=True):
        pair = [group[group[by] == label] for label in (a, b)]
        if any(len(side) > 1 for side in pair):
            raise ValueError(f"several {metric!r} rows for n={n} with {by}={a!r} or {b!r}: keep one curve per {by} value")
        if any(side.empty for side in pair):
            continue
        (row_a, row_b) = (side.iloc[0] for side in pair)
        difference = paired(row_a, row_b, resamples=resamples, seed=seed)
        table.append({"n": n, "fraction": row_a["fraction"], f"{by}={a}": row_a["value"], f"{by}={b}": row_b["value"],
                      "difference": difference.value, "ci_low": difference.low, "ci_high": difference.high})  # fmt: skip
    if not table:
        raise ValueError(f"no n has {metric!r} rows for both {by}={a!r} and {by}={b!r}")
    return pd.DataFrame(table)


def collapse_point(results: pd.DataFrame, metric: str = "mmlu", chance: float | None = None, *,
                   resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """The paper's central quantity: the smallest fraction of layers dropped at which accuracy is no
    longer distinguishable from chance (its Wilson 95% interval reaches `chance`), with a 95% interval
    from resampling the questions (percentile bootstrap, the same questions at every n).

    results: one sweep curve (one criterion, healed or not). chance: default kit.experiments.results.chance_level(results, metric).
    Returns (fraction, (low, high)); inf where accuracy stays above chance at every fraction swept.
    """
    rows = results[results["metric"] == metric].sort_values("n")
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r}; metrics present: {sorted(results['metric'].unique())}")
    chance = _results.chance_level(results, metric) if chance is None else chance
    if chance is None:
        raise ValueError(f"no chance level known for {metric!r} (its rows carry none): pass chance=")
    if rows["n"].duplicated().any():
        raise ValueError("results hold several curves: select one, e.g. results[results.criterion == 'similarity']")
    right = np.stack([_results.outcomes(row) for _, row in rows.iterrows()])  # [points, questions]
    fractions = np.append(rows["fraction"].to_numpy(float), math.inf)

    def first_collapse(hits: np.ndarray) -> np.ndarray:  # hits [..., points] -> fraction per leading index
        low, _ = wilson(hits, right.shape[1])
        collapsed = low <= chance
        return fractions[np.where(collapsed.any(-1), collapsed.argmax(-1), len(fractions) - 1)]

    rng = np.random.default_rng(seed)
    resampled = np.stack([right[:, rng.integers(right.shape[1], size=right.shape[1])].sum(1) for _ in range(resamples)])
    low, high = np.quantile(first_collapse(resampled), [0.025, 0.975], method="inverted_cdf")
    return float(first_collapse(right.sum(1))), (float(low), float(high))


def collapse_points(results: pd.DataFrame, metric: str = "mmlu", chance: float | None = None, **kwargs) -> pd.DataFrame:
    """collapse_point of each criterion's unhealed curve in a sweeps() table: one row per criterion
    with the fraction dropped where `metric` reaches chance and its 95% interval (inf: beyond the sweep)."""
    unhealed = results[~results["healed"].astype(bool)]
    rows = []
    for criterion, curve in unhealed.groupby("criterion", sort=False):
        fraction, (low, high) = collapse_point(curve, metric, chance, **kwargs)
        rows.append({"criterion": criterion, "metric": metric, "collapse": fraction, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def healing_gains(results: pd.DataFrame, metric: str = "mmlu", **kwargs) -> pd.DataFrame:
    """For each criterion with healed rows, healed minus unhealed `metric` on the same questions at
    every healed n, with its paired bootstrap 95% interval (paired_comparison), plus a criterion column."""
    tables = [
        paired_comparison(curve, "healed", True, False, metric=metric, **kwargs).assign(criterion=criterion)
        for criterion, curve in results.groupby("criterion", sort=False)
        if curve["healed"].astype(bool).any()
    ]
    if not tables:
        raise ValueError("no healed rows: sweep with heal_ns (kit.experiments.sweep.sweeps(..., heal_ns=[...]))")
    return pd.concat(tables, ignore_index=True)


def by_metric(function, results: pd.DataFrame, metrics, *args, **kwargs) -> pd.DataFrame:
    """function(results, *args, metric=m, **kwargs) for each metric m, one table with a metric column,
    e.g. by_metric(collapse_points, results, ["recall", "mmlu"])."""
    return pd.concat([function(results, *args, metric=m, **kwargs).assign(metric=m) for m in metrics], ignore_index=True)


LOWER_IS_BETTER = ("val_loss", "val_loss_norm")  # metrics where less is better; accuracies are better higher


def _decode_time_saved(wide: pd.DataFrame) -> pd.Series:
    """1 - (unpruned decode speed / this one's): the fraction of the unpruned model's decode time per token saved."""
    unpruned = wide.loc[wide["budget"] == 0, "decode_tokens_per_s"].iloc[0]
    return 1 - unpruned / wide["decode_tokens_per_s"]


def budget_table(table: pd.DataFrame) -> pd.DataFrame:
    """A budget sweep's rows (kit.experiments.budget.budget_sweep) one per point: budget, unit, criterion, n,
    removed, fraction, then each metric's value (and "{metric}_ci_low" / "_ci_high" where it has an interval),
    and decode_time_saved where decode speed was measured (InferenceCost among the evaluations)."""
    point = ["budget", "unit", "criterion", "n", "removed", "fraction"]
    wide = table.set_index([*point, "metric"])[["value", "ci_low", "ci_high"]].unstack("metric")
    wide.columns = [metric if kind == "value" else f"{metric}_{kind}" for kind, metric in wide.columns]
    wide = wide.dropna(axis=1, how="all").reset_index()
    if "decode_tokens_per_s" in wide:
        wide["decode_time_saved"] = _decode_time_saved(wide)
    return wide


def best_by_budget(table: pd.DataFrame, metric: str = "val_loss", *, reference=("block", "similarity"), resamples: int = 2000,
                   seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """For each budget of a budget sweep, the choice with the best `metric` (lowest loss, highest accuracy), and
    its paired difference to the `reference` choice (unit, criterion; default the paper's block) on the same
    texts or questions, with its paired bootstrap 95% interval.

    Returns one row per budget: budget, unit, criterion, removed, fraction, value, ci_low, ci_high, reference
    (the reference's value; NaN where it has no point at this budget), difference, diff_low, diff_high.
    """
    rows = table[(table["metric"] == metric) & (table["budget"] > 0)]
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r} at a budget; metrics present: {sorted(table['metric'].unique())}")
    best = []
    for budget, group in rows.groupby("budget", sort=True):
        winner = group.loc[group["value"].idxmin() if metric in LOWER_IS_BETTER else group["value"].idxmax()]
        ref = group[(group["unit"] == reference[0]) & (group["criterion"] == reference[1])]
        difference = paired(winner, ref.iloc[0], resamples=resamples, seed=seed) if len(ref) else None
        best.append({
            **{k: winner[k] for k in ("budget", "unit", "criterion", "removed", "fraction", "value", "ci_low", "ci_high")},
            "reference": ref["value"].iloc[0] if len(ref) else math.nan,
            **{k: getattr(difference, v) if difference else math.nan
               for k, v in (("difference", "value"), ("diff_low", "low"), ("diff_high", "high"))},
        })  # fmt: skip
    return pd.DataFrame(best)
