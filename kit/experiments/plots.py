"""Figures with matplotlib/seaborn (headless-safe). Each function draws on `ax` (a new figure
when None) and returns the Axes."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle

from ..core.artifacts import atomic_path
from ..core.stats import Z95
from .curves import LABELS, budget_table
from .results import chance_level

# One colour and marker per criterion and checkpoint across every figure of the kit. The similarity
# criterion chooses by the paper's metric (angular_last), so the two share a style.
STYLES = {
    "similarity": ("#1f77b4", "o"), "angular_last": ("#1f77b4", "o"), "heuristic": ("#ff7f0e", "s"),
    "angular_all": ("#2ca02c", "^"), "block_influence": ("#9467bd", "D"), "loss": ("#d62728", "v"),
    "unhealed": ("#7f7f7f", "o"), "healed": ("#17becf", "P"),
    "original": ("#000000", "*"), "pruned": ("#8c564b", "*"), "healed (unmerged)": ("#e377c2", "*"),
}  # fmt: skip
AXIS_LABELS = {
    **LABELS, "fraction": "fraction of layers dropped", "n": "block size n (layers removed)",
    "angular_last": "angular distance, last token (arccos(cos) / π)", "angular_all": "angular distance, all tokens (arccos(cos) / π)",
    "block_influence": "Block Influence, all tokens (1 - cos)",
}  # fmt: skip


def style(name) -> dict:
    """The colour and marker of a criterion or checkpoint (healed True / False: "healed" /
    "unhealed"), the same in every figure; other names get grey circles."""
    name = {True: "healed", False: "unhealed"}.get(name, name) if isinstance(name, (bool, np.bool_)) else name
    color, marker = STYLES.get(str(name), ("#7f7f7f", "o"))
    return {"color": color, "marker": marker}


def label(column: str) -> str:
    """A column or metric name in words, with its unit, for an axis (the name itself when unknown)."""
    return AXIS_LABELS.get(column, column)


def _axes(ax, figsize=(7, 5)):
    return ax if ax is not None else plt.subplots(figsize=figsize)[1]


def _panels(rows: int, columns: int, panel_size) -> np.ndarray:
    """A new figure of rows x columns panels of `panel_size` inches each, as a 2-D array of Axes."""
    return plt.subplots(rows, columns, squeeze=False, figsize=(panel_size[0] * columns, panel_size[1] * rows))[1]


def save(ax, path: str | Path, dpi: int = 150) -> Path:
    """Write the figure holding `ax` to `path` (format from the suffix), atomically."""
    with atomic_path(path) as tmp:
        ax.figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return Path(path)


def distance_heatmap(distances, normalize_rows: bool = False, mark_best: bool = True, mark_noise: bool = False,
                     highlight=None, ax=None):  # fmt: skip
    """The paper's Figure 4: distance of every block, x = first layer `start`, y = block size n.

    normalize_rows: rescale each row to [0, 1], so the cheapest start of every n stands out.
    mark_best: mark the argmin of each row (the block `best_block(n)` picks).
    mark_noise: circle the blocks within noise of each row's best (Distances.within_noise): the
        scan cannot tell them apart from it.
    highlight: a Block to draw as a box, e.g. the one chosen for pruning.
    """
    L = distances.num_layers
    grid = distances.by_block()[1:L, :L]  # n = 1 .. L-1 (valid block sizes) x start = 0 .. L-1
    if normalize_rows:
        low, high = np.nanmin(grid, axis=1, keepdims=True), np.nanmax(grid, axis=1, keepdims=True)
        grid = (grid - low) / np.where(high > low, high - low, 1.0)
    ax = _axes(ax)
    cmap = sns.color_palette("viridis", as_cmap=True).with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap, interpolation="nearest",
        extent=(-0.5, L - 0.5, 0.5, L - 0.5),
    )  # fmt: skip
    metric = label(distances.meta.get("metric", "distance"))
    ax.figure.colorbar(image, ax=ax, label=f"{metric}, row-normalized" if normalize_rows else metric)
    if mark_best:
        ns = np.arange(1, L)
        ax.plot([distances.best_block(n).start for n in ns], ns, "r.-", lw=1, ms=4, label="best start per n")
    if mark_noise:
        cells = [(start, n) for n in range(1, L) for start in np.flatnonzero(distances.within_noise(n))]
        starts, ns = zip(*cells)
        ax.plot(starts, ns, "o", mec="white", mfc="none", ms=6, ls="none", label="within noise of the best")
    if highlight is not None:
        ax.add_patch(
            Rectangle((highlight.start - 0.5, highlight.n - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2.5)
        )
    ax.set(xlabel="first layer of the block (start)", ylabel="block size n")
    ax.set_title(f"{distances.meta.get('model', 'model')}: distance of dropping layers start..start+n-1")
    return ax


def distance_curves(distances, ns, ax=None):
    """The paper's Figure 1(b): distance of each block of size n against its first layer, for several n,
    with a band of +-1.96 standard errors (95%) when the scan measured them."""
    ax = _axes(ax)
    table = distances.by_block()
    errors = None if distances.stderr is None else distances.stderr_by_block()
    palette = sns.color_palette("rocket_r", len(ns))
    for color, n in zip(palette, ns):
        starts = np.arange(distances.num_layers - n + 1)
        ax.plot(starts, table[n, starts], color=color, label=f"n = {n}")
        if errors is not None:
            half = Z95 * errors[n, starts]
            ax.fill_between(starts, table[n, starts] - half, table[n, starts] + half, color=color, alpha=0.2, lw=0)
    ax.set(xlabel="first layer of the block (start)", ylabel=label(distances.meta.get("metric", "distance")))
    ax.set_title(f"{distances.meta.get('model', 'model')}: block distance by position")
    ax.legend(title="block size", fontsize="small")
    return ax


MIN_CURVE_POINTS = 3  # fewer points are drawn as markers with error bars, never joined into a curve


def sweep_plot(results, metric: str, *, hue: str = "criterion", chance: float | None = None, ax=None):
    """The paper's Figures 2, 3, 5 and 6: `metric` against the fraction of layers dropped, with
    each curve's 95% interval (columns ci_low, ci_high, where present).

    A group of at least MIN_CURVE_POINTS points is a line with markers and a band for its interval;
    one or two points are markers with error bars only, so they never pose as a curve.
    results: the DataFrame of kit.experiments.sweep.sweep (several concatenated); hue: the column compared,
    "criterion" (similarity vs heuristic) or "healed"; chance: the chance line drawn, by default
    the metric's own (kit.experiments.results.chance_level: MMLU 0.25, recall 1 / facts; none for losses).
    """
    ax = _axes(ax)
    rows = results[results["metric"] == metric]
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r}; metrics present: {sorted(results['metric'].unique())}")
    for level, curve in rows.groupby(hue, sort=False):
        curve = curve.sort_values("fraction")
        x, y = curve["fraction"].to_numpy(float), curve["value"].to_numpy(float)
        has_ci = {"ci_low", "ci_high"} <= set(curve) and curve[["ci_low", "ci_high"]].notna().any(axis=None)
        joined = len(curve) >= MIN_CURVE_POINTS
        name = {True: "healed", False: "unhealed"}.get(level, level) if hue == "healed" else level
        (line,) = ax.plot(x, y, ls="-" if joined else "none", label=str(name), **style(name))
        if has_ci and joined:
            ax.fill_between(x, curve["ci_low"], curve["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
        elif has_ci:
            low, high = curve["ci_low"].to_numpy(float), curve["ci_high"].to_numpy(float)
            ax.errorbar(x, y, yerr=np.abs([y - low, high - y]), fmt="none", ecolor=line.get_color(), capsize=4)
    chance = chance_level(results, metric) if chance is None else chance
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.legend(title=hue)
    ax.set(xlabel=label("fraction"), ylabel=label(metric))
    return ax


def sweep_figure(results, metrics, *, hue: str = "criterion", rows: str | None = None, panel_size=(6.5, 4.5)):
    """One sweep_plot panel per metric side by side (e.g. recall and loss against the fraction
    dropped), each with its metric's chance line; rows="criterion" gives each criterion its own row of
    panels (e.g. with hue="healed"). Returns the Axes as an array [rows, metrics]; kit.experiments.plots.save
    on any of them writes the figure."""
    levels = list(dict.fromkeys(results[rows])) if rows else [None]
    axes = _panels(len(levels), len(metrics), panel_size)
    for level, row in zip(levels, axes):
        part = results if level is None else results[results[rows] == level]
        for metric, ax in zip(metrics, row):
            sweep_plot(part, metric, hue=hue, ax=ax)
            if level is not None:
                ax.set_title(f"{rows} = {level}")
    axes[0, 0].figure.tight_layout()
    return axes


def losses_bar(losses: dict, *, title: str | None = None, ax=None):
    """Normalised validation losses side by side, e.g. {"original": LossResult, "pruned": LossResult}
    (kit.evaluate.validation_loss), each bar with its 95% interval (+-1.96 standard errors over texts)."""
    ax = _axes(ax, figsize=(4, 3))
    labels = list(losses)
    heights = [loss.normalized for loss in losses.values()]
    errors = [Z95 * loss.stderr * loss.normalized / loss.loss for loss in losses.values()]  # the stderr in normalised units
    ax.bar(labels, heights, yerr=errors, capsize=4, color=[style(name.split(" (")[0])["color"] for name in labels])
    ax.set(ylabel=label("val_loss_norm"), title=title)
    return ax


def heal_curve(history: dict, ax=None):
    """Training and validation loss of a healing run against the optimiser step (HealResult.history)."""
    ax = _axes(ax)
    for key, style in (("train", dict(lw=1, alpha=0.8)), ("validation", dict(marker="o", lw=2))):
        points = history.get(key, [])
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=key, **style)
    ax.set(xlabel="optimiser step", ylabel="loss (nats per token)", title="healing")
    ax.legend()
    return ax


EXACT_COSTS = ("weight_bytes", "parameters", "kv_bytes_per_token")  # counted from the model: relative to the unpruned one
SPEEDS = {"decode_tokens_per_s": "decode_spread", "prefill_tokens_per_s": "prefill_spread"}  # measured: with their spread


def quality_cost(results, metric: str, *, comparison=None, cost: str = "weight_bytes", ax=None):
    """Quality against what the model costs: `metric` against an exact cost (EXACT_COSTS, as a fraction of
    the unpruned model's) or a measured speed (SPEEDS, with error bars of half the repeats' spread,
    (max - min) / median, either side).

    results: kit.experiments.sweep.sweep rows with kit.evaluate.metrics.InferenceCost() among the evaluations; one line per
    criterion joining the block sizes in order of n, healed rows on their own dashed line.
    comparison: kit.experiments.sweep.compare's table; each checkpoint (original, pruned, healed...) a star.
    """
    if cost not in EXACT_COSTS and cost not in SPEEDS:
        raise ValueError(f"cost {cost!r} is neither exact {EXACT_COSTS} nor a measured speed {tuple(SPEEDS)}")
    needed = {metric, cost} | ({SPEEDS[cost]} if cost in SPEEDS else set())
    if missing := sorted(needed - set(results["metric"])):
        raise ValueError(
            f"no rows for {missing}; metrics present: {sorted(results['metric'].unique())}. "
            "Cost needs kit.evaluate.metrics.InferenceCost() among the sweep's evaluations."
        )
    ax = _axes(ax)
    table = results.pivot_table(index=["criterion", "healed", "n"], columns="metric", values="value").reset_index()
    unpruned = table.loc[table["n"] == 0, cost].iloc[0] if (table["n"] == 0).any() else None
    if cost in EXACT_COSTS and unpruned is None:
        raise ValueError("an exact cost is drawn relative to the unpruned model: the sweep needs n = 0")

    def draw(rows, name, **kwargs):
        x = rows[cost] / unpruned if cost in EXACT_COSTS else rows[cost]
        xerr = None if cost in EXACT_COSTS else rows[cost] * rows[SPEEDS[cost]] / 2
        return ax.errorbar(x, rows[metric], xerr=xerr, label=name, capsize=3, **{**style(name.split(",")[0]), **kwargs})

    for (criterion, healed), rows in table.groupby(["criterion", "healed"], sort=False):
        draw(rows.sort_values("n"), f"{criterion}, healed" if healed else criterion, ls="--" if healed else "-",
             mfc="white" if healed else None)  # fmt: skip
    if comparison is not None:
        if absent := sorted(needed - set(comparison.columns)):
            raise ValueError(f"the comparison has no column {absent}: pass the same evaluations to kit.experiments.sweep.compare")
        if cost in EXACT_COSTS:
            unpruned = comparison[cost].iloc[0]  # the first checkpoint is the original
        for name, row in comparison.iterrows():
            draw(row.to_frame().T, name, marker="*", ls="none", ms=14, zorder=3)  # checkpoints are stars, in their colour
    what = f"fraction of the unpruned model's {label(cost)}" if cost in EXACT_COSTS else label(cost)
    ax.set(xlabel=what, ylabel=label(metric), title=f"{label(metric)} against {'the' if cost in EXACT_COSTS else 'measured'} cost")
    ax.legend(fontsize="small")
    return ax


def quality_cost_figure(results, metrics, *, comparison=None, costs=("weight_bytes", "decode_tokens_per_s"),
                        panel_size=(6.5, 4.5)):
    """A row of quality_cost panels per metric: an exact cost first, then a measured speed with its spread.
    Returns the Axes as an array [metrics, costs]."""
    axes = _panels(len(metrics), len(costs), panel_size)
    for metric, row in zip(metrics, axes):
        for cost, ax in zip(costs, row):
            quality_cost(results, metric, comparison=comparison, cost=cost, ax=ax)
    axes[0, 0].figure.tight_layout()
    return axes


UNIT_COLORS = {"block": "#1f77b4", "layers": "#2ca02c", "attention": "#d62728", "mlp": "#9467bd"}  # budget figures
BUDGET_AXES = {"fraction": "fraction of the parameters removed", "decode_time_saved": "fraction of decode time per token saved"}


def _saved_spread(wide, rows):
    """Half the spread of a decode time saved, either side: 1 - saved is the ratio of two measured times per token,
    each off by up to half its repeats' spread ((max - min) / median, decode_spread). None without the spreads."""
    if "decode_spread" not in wide:
        return None
    unpruned = wide.loc[wide["budget"] == 0, "decode_spread"].iloc[0]
    return (1 - rows["decode_time_saved"]) * (rows["decode_spread"] + unpruned) / 2


def budget_plot(table, metric: str = "val_loss", *, cost: str = "fraction", ax=None):
    """`metric` against what was removed: the fraction of the parameters ("fraction") or of the measured decode
    time per token ("decode_time_saved", with horizontal bars of half the timed repeats' spread either side, its own
    and the unpruned model's), one line per unit and criterion over the budgets, with 95% intervals; the unpruned
    model is a black star at 0.

    table: kit.experiments.budget.budget_sweep's rows (with InferenceCost among the evaluations for decode time).
    """
    wide = budget_table(table)
    if metric not in wide or cost not in wide:
        raise ValueError(f"the budget sweep has no {sorted({metric, cost} - set(wide))}: evaluate {metric!r} (and "
                         "kit.evaluate.metrics.InferenceCost for decode time) in budget_sweep")  # fmt: skip
    ax, dashes = _axes(ax), {}
    for (unit, criterion), rows in wide[wide["budget"] > 0].groupby(["unit", "criterion"], sort=False):
        rows = rows.sort_values("budget")
        y = rows[metric].to_numpy(float)
        low, high = (rows.get(f"{metric}_ci_{side}", pd.Series(y, index=rows.index)).to_numpy(float) for side in ("low", "high"))
        ls = dashes.setdefault(criterion, ["-", "--", ":", "-."][len(dashes) % 4])
        ax.errorbar(rows[cost], y, yerr=np.abs([y - low, high - y]), xerr=_saved_spread(wide, rows) if cost == "decode_time_saved" else None,
                    label=f"{unit} / {criterion}", color=UNIT_COLORS.get(unit), ls=ls, marker="o", capsize=3)  # fmt: skip
    unpruned = wide[wide["budget"] == 0]
    ax.plot(unpruned[cost], unpruned[metric], "k*", ms=12, label="unpruned")
    ax.set(xlabel=BUDGET_AXES.get(cost, label(cost)), ylabel=label(metric))
    ax.legend(fontsize="small")
    return ax


def budget_figure(table, metrics=("val_loss",), *, costs=("fraction", "decode_time_saved"), panel_size=(6.5, 4.5)):
    """budget_plot panels: one row per metric, one column per cost. Returns the Axes [metrics, costs]."""
    axes = _panels(len(metrics), len(costs), panel_size)
    for metric, row in zip(metrics, axes):
        for cost, ax in zip(costs, row):
            budget_plot(table, metric, cost=cost, ax=ax)
    axes[0, 0].figure.tight_layout()
    return axes


def regret_plot(comparison, ax=None):
    """Each criterion's regret (held-out loss above the oracle's best block) against the block size n.

    comparison: the DataFrame of kit.choose.oracle.compare_criteria."""
    ax = _axes(ax)
    criteria = list(dict.fromkeys(comparison["criterion"]))
    sns.lineplot(data=comparison, x="n", y="regret", hue="criterion", style="criterion", dashes=False, ax=ax,
                 palette={c: style(c)["color"] for c in criteria}, markers={c: style(c)["marker"] for c in criteria})
    ax.set_yscale("symlog", linthresh=0.01)  # regrets span 0 to tens of nats
    ax.set_ylim(bottom=0)
    ax.set(xlabel=label("n"), ylabel="regret (nats per token, symlog)")
    ax.set_title("held-out loss above the best block's, per criterion")
    return ax


def distance_vs_loss(distances, oracle, ns, ax=None):
    """For each n in `ns`, every block's distance against the held-out loss of removing it (one point per start)."""
    ax = _axes(ax)
    table = distances.by_block()
    for color, n in zip(sns.color_palette("rocket_r", len(ns)), ns):
        starts = np.arange(distances.num_layers - n + 1)
        ax.scatter(table[n, starts], oracle.loss[n, starts], color=color, s=18, label=f"n = {n}")
    ax.set(xlabel=label(distances.meta.get("metric", "distance")), ylabel="held-out loss without the block (nats per token)")
    ax.set_title(f"{distances.meta.get('model', 'model')}: does a smaller distance mean a smaller loss?")
    ax.legend(title="block size", fontsize="small")
    return ax


def heal_compare_figure(table: pd.DataFrame, *, panel_size=(5.0, 4.0)):
    """Notebook 07's table (heal_compare.csv): held-out loss, KL and recall against each method's CPU seconds: one colour per method, each point labelled with its n.
    Returns the first panel's Axes (kit.experiments.plots.save writes the figure)."""
    metrics = ("val_loss", "kl", "recall")
    axes = plt.subplots(1, len(metrics), figsize=(panel_size[0] * len(metrics), panel_size[1]))[1]
    colours = dict(zip(table["method"].unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, metric in zip(axes, metrics):
        rows = table[table["metric"] == metric]
        for method, group in rows.groupby("method", sort=False):
            ax.errorbar(group["cpu_s"], group["value"], yerr=[group["value"] - group["ci_low"], group["ci_high"] - group["value"]],
                        fmt="o", color=colours[method], label=method, capsize=2)  # fmt: skip
            for _, row in group.iterrows():
                ax.annotate(f"n={row['n']}", (row["cpu_s"], row["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("healing cost (CPU seconds)")
        ax.set_ylabel({"val_loss": "held-out loss (nats / token)", "kl": "KL to the unpruned model (nats / token)",
                       "recall": "in-context recall (accuracy)"}[metric])  # fmt: skip
    axes[0].legend(fontsize=8)
    return axes[0]
