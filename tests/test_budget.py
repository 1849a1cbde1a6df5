import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import kit  # noqa: E402
from kit import evaluate  # noqa: E402
from kit.core import layers  # noqa: E402
from kit.core.block import Block, Layers, heuristic_block  # noqa: E402
from kit.core.stats import paired_ratio_difference  # noqa: E402
from kit.evaluate import metrics  # noqa: E402
from kit.evaluate.inference_cost import parameters  # noqa: E402
from kit.experiments import budget, curves, plots, results  # noqa: E402
from kit.loaders import data  # noqa: E402

TEXTS = data.corpus("validation")[:3]


def _layer_parameters(model) -> int:
    return sum(p.numel() for p in layers.decoder_layers(model)[0].parameters())


def test_fit_takes_the_most_units_within_the_budget():
    model, _ = kit.testing.tiny_model("llama", num_layers=6)
    share = _layer_parameters(model) / parameters(model)
    choice = budget.Choice("block", "heuristic", lambda n: heuristic_block(6, n))

    n, removal, fraction = budget.fit(model, choice, 2.5 * share)
    assert (n, removal) == (2, Block(3, 2)) and fraction == pytest.approx(2 * share, rel=1e-12)
    assert budget.fit(model, choice, 0.5 * share) is None
    assert budget.fit(model, choice, 0.99)[0] == 5  # a block of 6 layers is refused: the fit stops at 5


def test_removed_parameters_counts_the_removed_layers_and_restores_the_model(snapshot):
    model, _ = kit.testing.tiny_model("qwen3_moe", num_layers=6)
    before = snapshot(model)
    expected = sum(p.numel() for i in (0, 2) for p in layers.decoder_layers(model)[i].parameters())
    assert budget.removed_parameters(model, Layers({0, 2})) == expected
    assert snapshot(model) == before and layers.num_layers(model) == 6


def test_budget_sweep_equals_evaluating_each_pruned_copy(snapshot):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=6)
    before = snapshot(model)
    share = _layer_parameters(model) / parameters(model)
    order = [4, 1, 3, 0, 2]
    choices = [budget.Choice("block", "heuristic", lambda n: heuristic_block(6, n)),
               budget.Choice("layers", "given", lambda n: Layers(order[:n]))]  # fmt: skip
    calls = []

    def counted(m, t):
        calls.append(1)
        return {}

    evals = [metrics.ValidationLoss(TEXTS, max_length=32), counted]
    table = budget.budget_sweep(model, tokenizer, choices=choices, budgets=[2.5 * share, 1.5 * share, 1.2 * share], evals=evals)

    assert list(table.columns) == [*budget.POINT, *results.METRIC]
    assert len(calls) == 1 + 2 + 2  # unpruned; block n=1, n=2; layers {4}, {1, 4}: the n=1 points of two budgets once each
    loss = table[table.metric == "val_loss"]
    assert len(loss) == 1 + 3 * 2
    for _, row in loss.iterrows():
        removal = None if row.n == 0 else heuristic_block(6, row.n) if row.unit == "block" else Layers(order[: row.n])
        assert row.removed == ("" if removal is None else removal.label)
        assert row.fraction == pytest.approx(0 if removal is None else row.n * share, rel=1e-12, abs=0)
        pruned = model if removal is None else kit.drop_layers(model, removal)
        expected = evaluate.validation_loss(pruned, tokenizer, TEXTS, max_length=32)
        assert row.value == pytest.approx(expected.loss, abs=1e-6)
        assert results.per_text(row).tolist() == [[s, t] for s, t in zip(expected.text_losses, expected.text_tokens)]
    assert set(loss.loc[loss.budget == 2.5 * share, "n"]) == {2}
    assert snapshot(model) == before


@pytest.mark.parametrize("budgets, message", [([0.0], "not fractions"), ([1.5], "not fractions")])
def test_budget_sweep_refuses_budgets_outside_0_1(budgets, message):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match=message):
        budget.budget_sweep(model, tokenizer, choices=[budget.Choice("block", "h", lambda n: Block(0, n))], budgets=budgets, evals=[])


def test_choice_refuses_an_unknown_unit():
    with pytest.raises(ValueError, match="unit 'heads' is not one of"):
        budget.Choice("heads", "x", lambda n: None)


def _row(budget_, unit, criterion, metric, value, per_text=None, low=None, high=None, fraction=None):
    return dict(budget=budget_, unit=unit, criterion=criterion, n=1, removed="x", fraction=budget_ if fraction is None else fraction,
                metric=metric, value=value, ci_low=value - 0.1 if low is None else low, ci_high=value + 0.1 if high is None else high,
                chance=math.nan, outcomes=None, per_text=results.encode_per_text(per_text))  # fmt: skip


def _synthetic():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 20, size=8)
    per_text = {name: np.stack([tokens * (3 + shift + rng.normal(0, 0.1, 8)), tokens], 1)
                for name, shift in (("none", 0), ("block", 0.5), ("attention", 0.2), ("block2", 1.0), ("attention2", 1.3))}  # fmt: skip
    mean = {name: p[:, 0].sum() / p[:, 1].sum() for name, p in per_text.items()}
    rows = [_row(0, "none", "none", "val_loss", mean["none"], per_text["none"]),
            _row(0.1, "block", "similarity", "val_loss", mean["block"], per_text["block"]),
            _row(0.1, "attention", "greedy", "val_loss", mean["attention"], per_text["attention"]),
            _row(0.2, "block", "similarity", "val_loss", mean["block2"], per_text["block2"]),
            _row(0.2, "attention", "greedy", "val_loss", mean["attention2"], per_text["attention2"])]  # fmt: skip
    speeds = {(0, "none"): 100.0, (0.1, "block"): 125.0, (0.1, "attention"): 110.0, (0.2, "block"): 150.0, (0.2, "attention"): 120.0}
    rows += [_row(b, u, "none" if u == "none" else "similarity" if u == "block" else "greedy", "decode_tokens_per_s", s, low=math.nan,
                  high=math.nan) for (b, u), s in speeds.items()]  # fmt: skip
    return pd.DataFrame(rows), per_text


def test_best_by_budget_picks_the_lowest_loss_and_pairs_it_with_the_block():
    table, per_text = _synthetic()
    best = curves.best_by_budget(table, "val_loss")
    assert best[["budget", "unit", "criterion"]].values.tolist() == [[0.1, "attention", "greedy"], [0.2, "block", "similarity"]]
    expected = paired_ratio_difference(per_text["attention"], per_text["block"])
    first = best.iloc[0]
    assert (first.difference, first.diff_low, first.diff_high) == pytest.approx((expected.value, expected.low, expected.high))
    assert first.difference < 0 and first.diff_high < 0  # attention beats the block on the same texts
    assert best.iloc[1].difference == 0  # the block is its own reference
    assert first.reference == pytest.approx(per_text["block"][:, 0].sum() / per_text["block"][:, 1].sum())


def test_best_by_budget_without_the_reference_leaves_the_difference_empty():
    table, _ = _synthetic()
    best = curves.best_by_budget(table[table.unit != "block"], "val_loss")
    assert best["difference"].isna().all() and best["reference"].isna().all()
    with pytest.raises(ValueError, match="no rows for metric 'recall'"):
        curves.best_by_budget(table, "recall")


def test_budget_table_has_one_row_per_point_and_the_decode_time_saved():
    table, _ = _synthetic()
    wide = curves.budget_table(table)
    assert len(wide) == 5
    row = wide[(wide.budget == 0.2) & (wide.unit == "block")].iloc[0]
    assert row.decode_time_saved == pytest.approx(1 - 100 / 150)
    assert row.val_loss_ci_high - row.val_loss == pytest.approx(0.1)
    assert "decode_tokens_per_s_ci_low" not in wide


def test_budget_figure_draws_every_choice(tmp_path):
    table, _ = _synthetic()
    axes = plots.budget_figure(table, ["val_loss"])
    assert axes.shape == (1, 2)
    labels = [t.get_text() for t in axes[0, 1].get_legend().get_texts()]
    assert sorted(labels) == ["attention / greedy", "block / similarity", "unpruned"]
    assert plots.save(axes[0, 0], tmp_path / "budget.png").stat().st_size > 0
    with pytest.raises(ValueError, match="evaluate 'recall'"):
        plots.budget_plot(table, "recall")


def test_most_units_counts_the_smallest_units_that_fit():
    model, _ = kit.testing.tiny_model("llama", num_layers=6)
    share = _layer_parameters(model) / parameters(model)
    singles = [Layers([i]) for i in range(6)]
    assert [budget.most_units(model, singles, b * share) for b in (0.5, 1.01, 3.5, 6.01)] == [0, 1, 3, 6]


def test_decode_time_saved_is_drawn_with_the_spread_of_both_timings():
    table, _ = _synthetic()
    spreads = {0: 0.1, 0.1: 0.2, 0.2: 0.3}
    table = pd.concat([table, pd.DataFrame([_row(b, u, c, "decode_spread", spreads[b], low=math.nan, high=math.nan)
                                            for b, u, c in table.loc[table.metric == "decode_tokens_per_s", ["budget", "unit", "criterion"]].values])])  # fmt: skip
    ax = plots.budget_plot(table, "val_loss", cost="decode_time_saved")
    block = next(c for c in ax.containers if c.get_label() == "block / similarity")
    bars = block.lines[2][0].get_segments()  # the horizontal bars: [(x - err, y), (x + err, y)] per point
    widths = sorted(round((b[1][0] - b[0][0]) / 2, 9) for b in bars)
    assert widths == sorted(round((100 / s) * (spreads[b] + 0.1) / 2, 9) for b, s in ((0.1, 125.0), (0.2, 150.0)))
