"""What a run shows, read off its artifacts: the closing "Reading the result" of each notebook.

Every number comes from the run folder (CSV, JSON, the scan's metadata) and every statement is
decided by a rule on those numbers, stated beside it: the reading is true of the run in front of
you, whatever the model. `reading(run, notebook)` displays as Markdown in Jupyter."""

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.artifacts import read_json
from ..core.stats import Z95, Estimate, paired_ratio_difference, side
from ..scan.distances import Distances
from .curves import LABELS
from .results import read_csv


@dataclass(frozen=True)
class Reading:
    """A notebook's reading of its run, as Markdown lines."""

    notebook: str
    lines: tuple[str, ...]

    @property
    def markdown(self) -> str:
        return "\n".join(self.lines)

    def _repr_markdown_(self) -> str:
        return self.markdown

    def __str__(self) -> str:
        return self.markdown


def reading(run: str | Path, notebook: str) -> Reading:
    """The reading of `notebook` (e.g. "04_compare") from the artifacts it wrote in the run folder `run`."""
    if notebook not in READERS:
        raise ValueError(f"no reading for notebook {notebook!r}; notebooks: {sorted(READERS)}")
    return Reading(notebook, tuple(READERS[notebook](Path(run))))


def num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def pct(fraction: float) -> str:
    return "beyond the sweep" if math.isinf(fraction) else f"{100 * fraction:.0f}%"


def interval(low: float, high: float, show=num) -> str:
    return f"95% interval {show(low)} to {show(high)}"


def size(parameters: float) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.2f} M"


def listing(ns) -> str:
    return ", ".join(f"{n:g}" for n in ns) or "none"


def header(model: str, layers: int, parameters: float) -> str:
    return f"**`{model}`**: {layers:g} layers, {size(parameters)} parameters."


def _manifest(run: Path, step: str) -> dict:
    return read_json(run / "manifest.json")[step]


# -- 01: the scan -----------------------------------------------------------------------------------


def _similarity(run: Path) -> list[str]:
    distances = Distances.load(run / "distances.safetensors")
    step, meta, L = _manifest(run, "01_similarity"), distances.meta, distances.num_layers
    choices = pd.read_csv(run / "choices.csv", index_col="n")
    deep = [n for n, row in choices.iterrows() if row["best_start"] == row["heuristic_start"]]
    gap = choices["heuristic_distance"] - choices["best_distance"]
    beyond = gap > Z95 * (choices["best_stderr"] ** 2 + choices["heuristic_stderr"] ** 2) ** 0.5
    single = choices.loc[1]
    shares = {n: ast.literal_eval(row["stability"]) for n, row in choices.iterrows()}
    unsettled = {n: s for n, s in shares.items() if s.get(int(choices.loc[n, "best_start"]), 0) < 0.95}
    lines = [
        header(meta["model"], L, step["parameters"]) + f" Scanned on {meta['n_texts']:g} texts of at most "
        f"{meta['max_length']:g} tokens with the `{meta['metric']}` distance.",
        "",
        f"- **The best single layer to drop is layer {single['best_start']:g}** (distance {num(single['best_distance'])}"
        f" ± {num(single['best_stderr'])}).",
        f"- **The best block is the paper's heuristic block (the n layers before the final one) at {len(deep)} of "
        f"{len(choices)} block sizes** (n = {listing(deep)}; rule: the argmin's start equals the heuristic's).",
        f"- **The heuristic block is farther than the best block by more than the noise at {int(beyond.sum())} of "
        f"{len(choices)} sizes** (rule: the gap exceeds 1.96 standard errors of the difference).",
        f"- **The choice is settled at {len(choices) - len(unsettled)} of {len(choices)} sizes** (rule: the best start "
        "wins at least 95% of the bootstrap resamples of the texts)"
        + (": elsewhere " + "; ".join(f"n = {n}: " + ", ".join(f"start {s} {pct(v)}" for s, v in share.items())
                                      for n, share in unsettled.items()) if unsettled else "") + ".",  # fmt: skip
        "",
        "| n | best block | distance | heuristic block | distance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in sorted({n for n in distances_shown(L) if n in choices.index}):
        row = choices.loc[n]
        lines.append(f"| {n} | layers {row['best_start']:g} to {row['best_last']:g} | {num(row['best_distance'])} ± "
                     f"{num(row['best_stderr'])} | layers {row['heuristic_start']:g} to {row['heuristic_last']:g} | "
                     f"{num(row['heuristic_distance'])} ± {num(row['heuristic_stderr'])} |")  # fmt: skip
    return lines


def distances_shown(num_layers: int) -> list[int]:
    """The block sizes notebook 01 draws as curves and tabulates: 1, L/8, L/4 and L/2 (at least 1)."""
    return sorted({1, max(1, num_layers // 8), max(1, num_layers // 4), max(1, num_layers // 2)})


# -- 02: one block removed --------------------------------------------------------------------------


def _loss_change(before: dict, after: dict) -> tuple[str, Estimate]:
    """The change of validation loss on the same texts (losses.json: LossResult fields) with its paired
    bootstrap 95% interval, and 'rises' / 'falls' when that interval excludes 0, else 'does not change'."""
    if not before.get("text_losses"):
        raise ValueError("losses.json carries no per-text losses (written by an older kit): rerun notebook 02")
    change = paired_ratio_difference(*(np.stack([side["text_losses"], side["text_tokens"]], 1) for side in (after, before)))
    where = side(change.low, change.high, 0.0)
    return {"above": "rises", "below": "falls"}.get(where, "does not change beyond the noise"), change


def _select_and_prune(run: Path) -> list[str]:
    losses, step = read_json(run / "losses.json"), _manifest(run, "02_select_and_prune")
    block, original, pruned = losses["block"], losses["original"], losses["pruned"]
    verdict, change = _loss_change(original, pruned)
    return [
        header(block["model"], step["layers"], step["parameters"]),
        "",
        f"- **Removed layers {block['start']} to {block['start'] + block['n'] - 1}** (n = {block['n']}, chosen by "
        f"{block['source']}; distance {num(block['distance'])}).",
        f"- **The validation loss {verdict}**: {num(original['loss'])} ± {num(original['stderr'])} to "
        f"{num(pruned['loss'])} ± {num(pruned['stderr'])} nats per token (± one standard error over texts), a change of "
        f"{num(change.value)} ({interval(change.low, change.high)}); {num(original['normalized'])} to "
        f"{num(pruned['normalized'])} divided by log(vocabulary size) (rule: the paired bootstrap 95% interval of the "
        "change, over the same texts, excludes 0).",
    ]


# -- 03: healing ------------------------------------------------------------------------------------


def _restored(original: float, pruned: float, healed: float) -> float:
    """The share of the loss that pruning added which healing took away (NaN when pruning added none)."""
    return (pruned - healed) / (pruned - original) if pruned > original else math.nan


def _heal(run: Path) -> list[str]:
    losses, history = read_json(run / "heal_losses.json"), read_json(run / "heal_history.json")
    selection, step = read_json(run / "selection.json"), _manifest(run, "03_heal")
    original, pruned, healed = (losses[k] for k in ("original", "pruned", "healed"))
    below = side(healed["val_loss_ci_low"], healed["val_loss_ci_high"], pruned["val_loss"]) == "below"
    share = _restored(original["val_loss"], pruned["val_loss"], healed["val_loss"])
    method = history.get("method", "qlora")  # a heal_history.json of kit 0.2 is LoRA's
    lora = method in ("qlora", "distill")
    how = (f"healed by LoRA{' distilled from the original' if method == 'distill' else ''} for {step['config']['steps']} steps" if lora
           else f"healed by `{method}` in {num(history['cost']['cpu_s'], 1)} CPU seconds, {history['cost']['trained_parameters']:,} parameters trained")
    return [
        header(selection["model"], original["layers"], original["parameters"])
        + f" Pruned to {pruned['layers']:g} layers (layers {selection['start']} to {selection['start'] + selection['n'] - 1}"
        f" removed), {how}.",
        "",
        "| model | layers | validation loss (nats per token) | divided by log(vocabulary size) |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {row['layers']:g} | {num(row['val_loss'])} ({interval(row['val_loss_ci_low'], row['val_loss_ci_high'])}) "
          f"| {num(row['val_loss_norm'])} |" for name, row in zip(("original", "pruned", "healed"), (original, pruned, healed))),  # fmt: skip
        "",
        f"- **Healing {'lowers' if below else 'does not detectably lower'} the loss** (rule: the healed model's 95% "
        "interval lies below the pruned model's loss)"
        + (f": it restores {pct(share)} of the loss the pruning added." if math.isfinite(share) else "."),
    ] + ([f"- The validation loss during training, on the {step['config']['quantize'] or 'full-precision'} base, went from "
          f"{num(history['validation'][0]['loss'])} to {num(history['validation'][-1]['loss'])}."] if lora else [])


# -- 04: the sweep ----------------------------------------------------------------------------------


def _mmlu(row) -> str:
    where = side(row["ci_low"], row["ci_high"], row["chance"])
    words = {"contains": "is indistinguishable from chance", "above": "is above chance", "below": "is below chance"}[where]
    rule = {"contains": "contains", "above": "lies above", "below": "lies below"}[where]
    return (f"- **MMLU {words} on the unpruned model**: {num(row['value'])} of {len(row['outcomes'])} questions "
            f"({interval(row['ci_low'], row['ci_high'])}); the interval {rule} chance ({row['chance']:g}).")  # fmt: skip


def _collapse(row, curve) -> str:
    """One criterion's collapse point of one metric (collapse.csv), in words decided by where it lies in the sweep."""
    fractions = sorted(curve["fraction"].unique())
    swept = [f for f in fractions if f > 0]
    c = row["collapse"]
    n = curve.loc[curve["fraction"] == c, "n"]
    at = f" (n = {n.iloc[0]:g})" if len(n) else ""
    if c == 0:
        words = "already at chance before any layer is removed"
    elif math.isinf(c):
        words = f"stays above chance at every block size swept (up to {pct(max(fractions))})"
    elif swept and c == swept[0]:
        words = f"collapses at the first block size swept, {pct(c)}{at}"
    else:
        words = f"holds until {pct(max(f for f in fractions if f < c))} of the layers and collapses at {pct(c)}{at}"
    return f"  - {row['criterion']} blocks: {words}; collapse point {pct(c)} ({interval(row['ci_low'], row['ci_high'], pct)})."


LOSS_PHRASES = {"below": "cost less loss than the heuristic's", "above": "cost more", "contains": "cannot be told apart"}


def _criterion_loss(paired: pd.DataFrame) -> list[str]:
    paired = paired[paired["n"] > 0]
    verdicts = {r["n"]: side(r["ci_low"], r["ci_high"], 0) for _, r in paired.iterrows()}
    at = {v: [n for n, w in verdicts.items() if w == v] for v in LOSS_PHRASES}
    if len(at["below"]) == len(verdicts):
        words = "**The similarity blocks cost less loss than the heuristic's at every block size swept**"
    elif len(at["contains"]) == len(verdicts):
        words = "**The similarity blocks and the heuristic's cannot be told apart by their loss at any block size swept**"
    else:
        parts = [f"{phrase} at n = {listing(at[v])}" for v, phrase in LOSS_PHRASES.items() if at[v]]
        words = "**The similarity blocks " + ", ".join(parts[:-1]) + ", and " * (len(parts) > 1) + parts[-1] + "**"
    lines = [f"- {words} (rule: the paired bootstrap 95% interval of the difference, over the same texts, excludes 0).", "",
             f"| n | layers dropped | {LABELS['val_loss_norm']}, similarity | heuristic | similarity minus heuristic (95% interval) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for _, r in paired.iterrows():
        lines.append(f"| {r['n']:g} | {pct(r['fraction'])} | {num(r['criterion=similarity'])} | {num(r['criterion=heuristic'])} "
                     f"| {r['difference']:+.3f} ({num(r['ci_low'])} to {num(r['ci_high'])}) |")  # fmt: skip
    return lines + [""]


def _paired(paired: pd.DataFrame) -> list[str]:
    lines = []
    for metric, rows in paired[paired["n"] > 0].groupby("metric", sort=False):
        where = {n: side(r["ci_low"], r["ci_high"], 0) for n, r in rows.set_index("n").iterrows()}
        parts = [f"{word} at n = {listing(n for n, w in where.items() if w == side_)}"
                 for word, side_ in (("higher", "above"), ("lower", "below")) if side_ in where.values()]  # fmt: skip
        verdict = (" and ".join(parts) + (", indistinguishable elsewhere" if "contains" in where.values() else "")
                   if parts else "indistinguishable from the heuristic's at every block size")  # fmt: skip
        lines.append(
            f"- **Paired on the same questions, {LABELS[metric]} of the similarity blocks is {verdict}** (rule: the paired "
            "bootstrap 95% interval of the difference excludes 0): "
            + ", ".join(f"n = {r['n']:g}: {r['difference']:+.3f} ({num(r['ci_low'])} to {num(r['ci_high'])})" for _, r in rows.iterrows())
            + "."
        )  # fmt: skip
    return lines


def _healing(results: pd.DataFrame, gains: pd.DataFrame) -> list[str]:
    loss = results[results["metric"] == "val_loss_norm"].set_index(["criterion", "n", "healed"])
    loss_gains = gains[gains["metric"] == "val_loss_norm"].set_index(["criterion", "n"])
    lines = ["| criterion | n | loss unhealed | loss healed (paired 95% interval of the change) | share of the added loss restored "
             "| accuracy gain (paired 95% interval) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lowered = detectable = 0
    twins = gains[gains["metric"] == gains.loc[gains["metric"] != "val_loss_norm", "metric"].iloc[0]]
    for _, g in twins.iterrows():
        before, after = loss.loc[(g["criterion"], g["n"], False), "value"], loss.loc[(g["criterion"], g["n"], True), "value"]
        change = loss_gains.loc[(g["criterion"], g["n"])]
        unpruned = loss.loc[(g["criterion"], 0, False), "value"] if (g["criterion"], 0, False) in loss.index else math.nan
        share = _restored(unpruned, before, after)
        lowered += side(change["ci_low"], change["ci_high"], 0) == "below"
        detectable += side(g["ci_low"], g["ci_high"], 0) != "contains"
        lines.append(f"| {g['criterion']} | {g['n']:g} | {num(before)} | {num(after)} ({change['difference']:+.3f}: "
                     f"{num(change['ci_low'])} to {num(change['ci_high'])}) | {pct(share) if math.isfinite(share) else 'none added'} "
                     f"| {g['difference']:+.3f} ({num(g['ci_low'])} to {num(g['ci_high'])}) |")  # fmt: skip
    paper = ("as the paper finds, healing restores the loss more than question answering" if lowered > detectable
             else "this run does not show the paper's finding that healing restores the loss more than question answering")
    return [f"- **Healing lowers the loss at {lowered} of {len(twins)} healed blocks and changes {LABELS[twins['metric'].iloc[0]]} "
            f"detectably at {detectable}**: {paper} (rules: the paired 95% interval of the healed minus the unhealed loss, "
            "over the same texts, lies below 0; the paired interval of the accuracy gain excludes 0).",
            "", *lines]  # fmt: skip


def _checkpoints(comparison: pd.DataFrame, metrics) -> list[str]:
    original = comparison.loc["original"]
    lines = [f"| checkpoint | layers | weight bytes | {' | '.join(LABELS[m] for m in metrics)} | {LABELS['decode_tokens_per_s']} |",
             "| --- " * (4 + len(metrics)) + "|"]  # fmt: skip
    for name, row in comparison.iterrows():
        cells = [f"{num(row[m])}" + (f" ({num(row[f'{m}_ci_low'])} to {num(row[f'{m}_ci_high'])})" if f"{m}_ci_low" in row else "")
                 for m in metrics]  # fmt: skip
        lines.append(f"| {name} | {row['layers']:g} | {pct(row['weight_bytes'] / original['weight_bytes'])} | "
                     f"{' | '.join(cells)} | {num(row['decode_tokens_per_s'], 1)} |")
    return ["The checkpoints of `02_select_and_prune` and `03_heal` (weight bytes relative to the original; decode speed measured on "
            "this machine, noisy where other work shares it):", "", *lines]  # fmt: skip


def _compare(run: Path) -> list[str]:
    results, comparison = read_csv(run / "sweep.csv"), pd.read_csv(run / "comparison.csv", index_col="model")
    unhealed = results[~results["healed"].astype(bool)]
    original, collapse = comparison.loc["original"], read_csv(run / "collapse.csv")
    unpruned = pd.read_csv(run / "unpruned.csv").set_index("metric")
    ns = sorted(unhealed["n"].unique())
    lines = [header(read_json(run / "selection.json")["model"], original["layers"], original["parameters"])
             + f" Block sizes swept for both criteria: n = {listing(ns)}.", "", _mmlu(unpruned.loc["mmlu"])]  # fmt: skip
    for metric, rows in collapse.groupby("metric", sort=False):
        lines.append(f"- **Where {LABELS[metric]} collapses** (rule: the collapse point is the smallest fraction of layers "
                     f"dropped at which the accuracy's 95% interval reaches chance):")  # fmt: skip
        lines += [_collapse(row, unhealed[(unhealed["metric"] == metric) & (unhealed["criterion"] == row["criterion"])])
                  for _, row in rows.iterrows()]  # fmt: skip
    paired = read_csv(run / "paired.csv")
    losses = paired["metric"] == "val_loss_norm"
    lines += _criterion_loss(paired[losses]) + _paired(paired[~losses])
    if (run / "healing_gains.csv").exists():
        lines += _healing(results, read_csv(run / "healing_gains.csv"))
    quality = [m for m in ("recall", "mmlu", "boolq", "val_loss_norm") if m in comparison.columns]
    return lines + [""] + _checkpoints(comparison, quality)


# -- 05: criteria against the oracle ----------------------------------------------------------------


def _criteria(run: Path) -> list[str]:
    table, step = pd.read_csv(run / "criteria.csv"), _manifest(run, "05_criteria")
    sizes = sorted(table["n"].unique())
    mean = table.groupby("criterion", sort=False)["regret"].mean()
    lines = [header(step["model"], step["layers"], step["parameters"]) + f" Block sizes n = {listing(sizes)}.", "",
             f"- **Lowest mean regret: `{mean.idxmin()}`** ({num(mean.min())} nats per token above the held-out best block, "
             "averaged over the block sizes).", "",
             "| criterion | finds the best block (regret 0) at n = | regret, nats per token | Spearman with the held-out losses |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for criterion, rows in table.groupby("criterion", sort=False):
        spearman = rows["spearman"].dropna()
        lines.append(f"| `{criterion}` | {listing(rows.loc[rows['regret'] == 0, 'n'])} | {num(rows['regret'].min())} to "
                     f"{num(rows['regret'].max())} | "
                     + (f"{num(spearman.min(), 2)} to {num(spearman.max(), 2)} |" if len(spearman) else "none |"))  # fmt: skip
    return lines


# -- 06: what to remove, on one budget -------------------------------------------------------------


def _versus_block(row) -> str:
    """The winner's paired difference of held-out loss to the paper's block, and its verdict."""
    if row["unit"] == "block" and row["criterion"] == "similarity":
        return "the paper's block itself wins"
    if math.isnan(row["difference"]):
        return "the paper's block has no point at this budget (one layer is over it)"
    verdict = {"below": "detectably lower than", "above": "detectably higher than"}.get(side(row["diff_low"], row["diff_high"], 0),
                                                                                         "not distinguishable from")  # fmt: skip
    return (f"{verdict} the paper's block ({num(row['reference'])}): paired difference {num(row['difference'])}, "
            f"{interval(row['diff_low'], row['diff_high'])}")  # fmt: skip


def _granularity(run: Path) -> list[str]:
    table, best, step = read_csv(run / "budget.csv"), read_csv(run / "budget_best.csv"), _manifest(run, "06_granularity")
    loss = table[(table["metric"] == "val_loss") & (table["budget"] > 0)]
    unpruned = table[(table["metric"] == "val_loss") & (table["budget"] == 0)]["value"].iloc[0]
    lines = [header(step["model"], step["layers"], step["parameters"])
             + f" Budgets: {', '.join(pct(b) for b in sorted(loss['budget'].unique()))} of the parameters; held-out loss unpruned "
             f"{num(unpruned)} nats per token.", ""]  # fmt: skip
    winners = {r["budget"]: r["unit"] for _, r in best.iterrows()}
    lines.append("- **Lowest held-out loss by granularity: " + "; ".join(f"{pct(b)}: {u}" for b, u in winners.items()) + "** "
                 "(rule: the choice of lowest held-out loss at each budget; its unit is the granularity).")  # fmt: skip
    for _, r in best.iterrows():
        lines.append(f"- At {pct(r['budget'])}: `{r['unit']} / {r['criterion']}` removes {r['removed']} ({pct(r['fraction'])} of the "
                     f"parameters), held-out loss {num(r['value'])} ({interval(r['ci_low'], r['ci_high'])}); {_versus_block(r)}.")  # fmt: skip
    lines.append("  (Rule for the comparison with the block: detectably lower or higher when the paired bootstrap 95% interval of "
                 "the difference, over the same texts, excludes 0.)")
    choices = list(dict.fromkeys(loss["unit"] + " / " + loss["criterion"]))
    lines += ["", "| budget | " + " | ".join(choices) + " |", "| --- |" + " --- |" * len(choices)]
    for budget, rows in loss.groupby("budget"):
        cells = dict(zip(rows["unit"] + " / " + rows["criterion"], rows["value"]))
        lines.append(f"| {pct(budget)} | " + " | ".join(num(cells[c]) if c in cells else "over budget" for c in choices) + " |")
    return lines


def _heal_compare(run: Path) -> list[str]:
    """Notebook 07: per block size the best method by held-out loss, whether it beats the cut beyond its paired
    interval (the interval's upper end below zero), its KL and recall against the cut's, and its cost."""
    step = _manifest(run, "07_heal_compare")
    table, paired, best = pd.read_csv(run / "heal_compare.csv"), pd.read_csv(run / "heal_paired.csv"), pd.read_csv(run / "heal_best.csv")
    unpruned = step["unpruned_val_loss"]
    lines = [f"**{step['model']}**, unpruned held-out loss {num(unpruned)} nats; each method healed the same cut "
             f"({step['config']['n_texts']} texts, {step['config']['steps']} training steps).", ""]  # fmt: skip
    for _, row in best.iterrows():
        n, method = int(row["n"]), row["method"]
        cut = table[(table["n"] == n) & (table["method"] == "none") & (table["metric"] == "val_loss")]["value"].iloc[0]
        share = (cut - row["value"]) / (cut - unpruned) if cut != unpruned else math.nan
        if method == "none":
            lines.append(f"- n={n}: no method lowered the held-out loss of the cut alone ({num(cut)} nats).")
            continue
        mine = paired[(paired["n"] == n) & (paired["method"] == method)].set_index("metric")
        loss = mine.loc["val_loss"]
        verdict = "beyond its paired interval" if loss["ci_high"] < 0 else "within its paired interval (not shown to be better)"
        extra = ", ".join(f"{m} {num(mine.loc[m, 'value'])} vs {num(mine.loc[m, 'cut'])}" for m in ("kl", "recall") if m in mine.index)
        lines.append(f"- n={n}: **{method}** is best, held-out loss {num(row['value'])} vs the cut's {num(cut)} nats "
                     f"(difference {num(loss['difference'])}, {interval(loss['ci_low'], loss['ci_high'])}, {verdict}; "
                     f"{pct(share)} of what the cut added), at {num(row['cpu_s'], 2)} CPU s; {extra}.")  # fmt: skip
    refused = read_json(run / "heal_refused.json")
    lines += [f"- refused, {where}: {why}" for where, why in refused.items()]
    return lines


READERS = {
    "01_similarity": _similarity,
    "02_select_and_prune": _select_and_prune,
    "03_heal": _heal,
    "04_compare": _compare,
    "05_criteria": _criteria,
    "06_granularity": _granularity,
    "07_heal_compare": _heal_compare,
}
