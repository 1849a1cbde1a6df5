"""Notebook 06 runs headless with small parameters (it needs no other notebook; here it runs in the smoke run's
folder after 01-05, and on the tiny hybrid MoE of the second run): every granularity and criterion at every budget,
each point what the kit computes from the saved scan and greedy orders, the best choice per budget, the figure."""

import pandas as pd
import pytest
from conftest import SMOKE_PARAMETERS, TINY_PARAMETERS, assert_redrawn

import kit
from kit.choose.greedy import GreedyRemoval
from kit.core.artifacts import read_json
from kit.evaluate.inference_cost import parameters
from kit.experiments import budget, curves

CHOICES = {("block", "similarity"), ("layers", "shortgpt"), ("layers", "greedy_layers"), ("attention", "llm_drop_attention"),
           ("attention", "greedy_attention"), ("mlp", "llm_drop_mlp"), ("mlp", "greedy_mlp")}  # fmt: skip


def _check_points(run, model_name: str, budgets: list[float]) -> pd.DataFrame:
    """Every point of budget.csv is the most units its criterion chooses within its budget, from the saved evidence."""
    table = pd.read_csv(run / "budget.csv")
    model, _ = kit.load_model(model_name, device="cpu")
    scan = kit.Distances.load(run / "sublayer_distances.safetensors")
    greedy = {path.stem.removeprefix("greedy_"): GreedyRemoval.load(path) for path in run.glob("greedy_*.safetensors")}
    L, total = scan.num_layers, parameters(model)
    points = table[table["budget"] > 0].drop_duplicates(["budget", "unit", "criterion"])
    assert set(zip(points["unit"], points["criterion"])) <= CHOICES and sorted(set(points["budget"])) == budgets
    for row in points.itertuples():
        evidence = dict(distances=scan if row.unit in ("attention", "mlp") else scan.layers(), greedy=greedy.get(row.unit))
        chosen = kit.choose.criteria.choose_units(row.criterion, L, row.n, **evidence)
        assert chosen.label == row.removed and row.fraction <= row.budget
        assert row.fraction == pytest.approx(budget.removed_parameters(model, chosen) / total)
        try:
            larger = kit.choose.criteria.choose_units(row.criterion, L, row.n + 1, **evidence)
        except ValueError:
            continue  # no more units: a greedy order ends at the largest budget's reach
        assert budget.removed_parameters(model, larger) / total > row.budget, f"{row.criterion} fits one more unit at {row.budget}"
    return table


def test_notebook_06_compares_every_granularity_on_one_budget(notebook_run):
    run, smoke = notebook_run("06_granularity"), SMOKE_PARAMETERS["06_granularity"]
    table = _check_points(run, "smollm2-135m", smoke["BUDGETS"])
    at = table[(table["metric"] == "val_loss") & (table["budget"] == 0.02)]
    assert "block" not in set(at["unit"])  # one of SmolLM2's layers is 2.6% of its parameters: no block fits 2%
    assert {"attention", "mlp"} <= set(at["unit"])
    assert {"val_loss", "recall", "mmlu", "decode_tokens_per_s"} <= set(table["metric"])  # SWEEP_MMLU True
    best = pd.read_csv(run / "budget_best.csv")
    pd.testing.assert_frame_equal(best, curves.best_by_budget(table), check_exact=False)
    step = read_json(run / "manifest.json")["06_granularity"]
    assert step["config"]["budgets"] == smoke["BUDGETS"] and step["layers"] == 30 and step["model"] == "smollm2-135m"


def test_notebook_06_point_equals_the_pruned_model_evaluated_anew(notebook_run):
    run, smoke = notebook_run("06_granularity"), SMOKE_PARAMETERS["06_granularity"]
    row = pd.read_csv(run / "budget.csv").query("metric == 'val_loss' and criterion == 'greedy_attention'").iloc[-1]
    model, tokenizer = kit.load_model("smollm2-135m", device="cpu")
    order = GreedyRemoval.load(run / "greedy_attention.safetensors")
    pruned = kit.drop_layers(model, order.first(int(row["n"])))
    texts = kit.loaders.data.load_texts("corpus", "validation", smoke["N_HELD_OUT"])
    expected = kit.evaluate.validation_loss(pruned, tokenizer, texts, max_length=smoke["MAX_LENGTH"], batch_size=smoke["BATCH_SIZE"])
    assert row["value"] == pytest.approx(expected.loss, abs=1e-5)


def test_notebook_06_on_the_tiny_hybrid(tiny_notebook_run, tiny_model_folder):
    run = tiny_notebook_run("06_granularity")
    table = _check_points(run, str(tiny_model_folder), TINY_PARAMETERS["06_granularity"]["BUDGETS"])
    swept = read_json(run / "manifest.json")["06_granularity"]["config"]["sweep_mmlu"]
    assert ("mmlu" in set(table["metric"])) == swept  # SWEEP_MMLU None: the rule on the unpruned model's interval decides


def test_notebook_06_figure_draws_the_saved_table(notebook_run, tmp_path):
    run = notebook_run("06_granularity")
    table = pd.read_csv(run / "budget.csv")
    axes = kit.experiments.plots.budget_figure(table, ["val_loss", "recall", "mmlu"])
    assert_redrawn(run / "budget.png", axes[0, 0], tmp_path)
