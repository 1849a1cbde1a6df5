import pandas as pd
import pytest
from conftest import SMOKE_PARAMETERS, assert_redrawn, printed

import kit
from kit.experiments import sweep

SMOKE = SMOKE_PARAMETERS["04_compare"]

COST = {"parameters", "weight_bytes", "kv_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
        "time_to_first_token_s", "peak_memory_bytes", "prefill_spread", "decode_spread"}  # fmt: skip


@pytest.fixture(scope="module")
def run(notebook_run):
    return notebook_run("04_compare")


def test_sweep_covers_both_criteria_and_every_metric(run):
    table = pd.read_csv(run / "sweep.csv")
    assert set(table["criterion"]) == set(sweep.PAPER_CRITERIA)
    assert sorted(set(table["n"])) == [0, 10, 20]
    assert set(table["metric"]) == {"recall", "mmlu", "mmlu_subjects", "val_loss", "val_loss_norm", "boolq"} | COST
    assert table["fraction"].max() == pytest.approx(20 / 30)
    unpruned = table[table["n"] == 0].pivot(index="criterion", columns="metric", values="value")
    assert (unpruned.nunique() == 1).all(), "n = 0 is the same model for both criteria: evaluated once, shared"
    intervals = table.dropna(subset=["ci_low"])
    assert {"recall", "mmlu", "val_loss"} <= set(intervals["metric"])
    assert (intervals["ci_low"] <= intervals["value"]).all() and (intervals["value"] <= intervals["ci_high"]).all()
    recall = table[table["metric"] == "recall"]
    assert recall["outcomes"].str.len().eq(SMOKE["RECALL_ITEMS"]).all()
    assert {p.name for p in run.glob("sweep-*.json")} == {f"sweep-{s}.json" for s in sweep.PAPER_CRITERIA}
    kv = table[table["metric"] == "kv_bytes_per_token"].set_index(["criterion", "n", "healed"])["value"]
    assert (kv.xs((20, False), level=("n", "healed")) == kv.xs((0, False), level=("n", "healed")) * 10 / 30).all()


def test_paired_comparison_of_the_criteria(run):
    paired = pd.read_csv(run / "paired.csv").query("metric == 'recall'").reset_index(drop=True)
    assert paired["n"].tolist() == [0, 10, 20]
    assert paired.loc[0, ["difference", "ci_low", "ci_high"]].tolist() == [0, 0, 0]  # n = 0: the same model
    assert (paired["ci_low"] <= paired["difference"]).all() and (paired["difference"] <= paired["ci_high"]).all()
    losses = pd.read_csv(run / "paired.csv").query("metric == 'val_loss_norm'").set_index("n")  # on the same texts
    swept = pd.read_csv(run / "sweep.csv").query("metric == 'val_loss_norm' and not healed").pivot(index="n", columns="criterion", values="value")
    assert losses["difference"].to_numpy() == pytest.approx((swept["similarity"] - swept["heuristic"]).loc[losses.index].to_numpy(), abs=1e-12)
    assert losses.loc[0, ["difference", "ci_low", "ci_high"]].tolist() == [0, 0, 0]
    collapse = pd.read_csv(run / "collapse.csv")
    assert collapse["criterion"].tolist() == list(sweep.PAPER_CRITERIA) * 2 and collapse["metric"].tolist() == ["recall"] * 2 + ["mmlu"] * 2


def test_each_criterion_heals_its_blocks_beside_their_unhealed_twins(run):
    table = pd.read_csv(run / "sweep.csv")
    healed = table[table["healed"]]
    assert set(healed["n"]) == {10} and set(healed["criterion"]) == set(sweep.PAPER_CRITERIA)
    for criterion in sweep.PAPER_CRITERIA:
        loss = table.query("metric == 'val_loss' and n == 10 and criterion == @criterion").set_index("healed")["value"]
        assert loss[True] != loss[False]
        assert (run / "sweep_healed" / criterion / "n10" / "adapter").is_dir()
    gains = pd.read_csv(run / "healing_gains.csv")
    assert gains["criterion"].tolist() == list(sweep.PAPER_CRITERIA) * 3 and set(gains["n"]) == {10}  # recall, mmlu, loss
    assert gains["metric"].tolist() == [m for m in ("recall", "mmlu", "val_loss_norm") for _ in sweep.PAPER_CRITERIA]
    for _, gain in gains[gains["metric"] == "val_loss_norm"].iterrows():  # paired over the same texts
        loss = table.query("metric == 'val_loss_norm' and n == 10 and criterion == @gain.criterion").set_index("healed")["value"]
        assert gain["difference"] == pytest.approx(loss[True] - loss[False], abs=1e-12)
        assert gain["ci_low"] <= gain["difference"] <= gain["ci_high"]


def test_comparison_of_original_pruned_and_healed(run):
    table = pd.read_csv(run / "comparison.csv", index_col="model")
    assert table.index.tolist() == ["original", "pruned", "healed (unmerged)", "healed"]
    assert table["layers"].tolist() == [30, 26, 26, 26]
    parameters = table["parameters"]
    assert parameters["original"] > parameters["pruned"] == parameters["healed"] < parameters["healed (unmerged)"]
    assert table.loc["pruned", "kv_bytes_per_token"] == table.loc["original", "kv_bytes_per_token"] * 26 / 30
    assert (table["decode_tokens_per_s"] > 0).all()
    assert {"recall", "mmlu", "boolq", "val_loss_norm"} <= set(table.columns)
    assert table["mmlu"].between(0, 1).all()


PANELS = ["recall", "mmlu", "val_loss_norm"]  # SWEEP_MMLU is True in the smoke parameters


def test_figures_draw_the_saved_tables(run, tmp_path):
    table = pd.read_csv(run / "sweep.csv")
    unhealed = table[~table["healed"]]
    axes = kit.experiments.plots.sweep_figure(unhealed, PANELS)
    for metric, ax in zip(PANELS, axes[0]):
        drawn = {line.get_label(): len(line.get_xdata()) for line in ax.lines}
        rows = unhealed[unhealed["metric"] == metric].groupby("criterion").size().to_dict()
        assert {s: drawn[s] for s in rows} == rows  # one point per row of the table
    assert_redrawn(run / "sweep.png", axes[0, 0], tmp_path)
    twins = table[table["n"].isin(SMOKE["HEAL_NS"])]
    axes = kit.experiments.plots.sweep_figure(twins, PANELS, hue="healed", rows="criterion")
    assert axes.shape == (2, 3) and {line.get_label() for line in axes[0, 0].lines} >= {"healed", "unhealed"}
    assert_redrawn(run / "sweep_healed.png", axes[0, 0], tmp_path)
    comparison = pd.read_csv(run / "comparison.csv", index_col="model")
    axes = kit.experiments.plots.quality_cost_figure(table, PANELS, comparison=comparison)
    assert axes.shape == (3, 2)
    points = {c.get_label(): len(c.lines[0].get_xdata()) for c in axes[0, 0].containers}
    assert points == {"similarity": 3, "heuristic": 3, "similarity, healed": 1, "heuristic, healed": 1, **{m: 1 for m in comparison.index}}
    assert_redrawn(run / "quality_cost.png", axes[0, 0], tmp_path)


def test_missing_heal_names_notebook_03(run, tmp_path):
    import papermill
    from conftest import REPO, SMOKE_PARAMETERS
    from papermill.exceptions import PapermillExecutionError

    empty = tmp_path / "runs"
    for name in ("distances.safetensors", "selection.json"):
        (empty / "partial").mkdir(parents=True, exist_ok=True)
        (empty / "partial" / name).write_bytes((run / name).read_bytes())
    (empty / "partial" / "pruned").mkdir()
    with pytest.raises(PapermillExecutionError, match="03_heal.ipynb"):
        papermill.execute_notebook(
            REPO / "notebooks" / "04_compare.ipynb", tmp_path / "out.ipynb", kernel_name="python3", progress_bar=False,
            parameters={**SMOKE_PARAMETERS["04_compare"], "RUN": "partial", "RUNS_ROOT": str(empty)}, cwd=str(REPO / "notebooks"),
        )  # fmt: skip


def test_the_swept_model_is_freed_before_the_comparison_loads_the_original_again(run):
    """compare warns when tensors of an earlier step are still referenced as it loads (kit.experiments.sweep.compare)."""
    assert "still referenced" not in printed(run.parent / "04_compare.ipynb")
