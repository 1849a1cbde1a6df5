"""The similarity figures draw exactly the numbers of the Distances they are given."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.patches import Rectangle

import kit
from kit.testing import random_distances

L = 8


@pytest.fixture
def distances():
    yield random_distances(L, seed=1)
    plt.close("all")


def test_heatmap_shows_every_block_with_blanks_where_none_fits(distances):
    ax = kit.experiments.plots.distance_heatmap(distances, mark_best=False)
    image = ax.images[0].get_array()
    table = distances.by_block()
    assert image.shape == (L - 1, L)  # n = 1 .. L-1 by start = 0 .. L-1
    for n in range(1, L):
        for start in range(L):
            if start + n > L:
                assert image.mask[n - 1, start]
            else:
                assert image[n - 1, start] == table[n, start]
    assert ax.images[0].get_extent() == [-0.5, L - 0.5, 0.5, L - 0.5]  # cell centres at (start, n)
    assert not ax.lines and not ax.patches


def test_heatmap_marks_the_best_block_of_each_row_and_the_highlight(distances):
    ax = kit.experiments.plots.distance_heatmap(distances, highlight=kit.Block(2, 3))
    (line,) = ax.lines
    assert list(line.get_ydata()) == list(range(1, L))
    assert list(line.get_xdata()) == [distances.best_block(n).start for n in range(1, L)]
    (box,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (1.5, 2.5, 1, 1)


def test_heatmap_normalized_rows_span_zero_to_one(distances):
    image = kit.experiments.plots.distance_heatmap(distances, normalize_rows=True).images[0].get_array()
    for row in image:  # every row n <= L-1 has at least two blocks
        assert row.min() == pytest.approx(0) and row.max() == pytest.approx(1)


def test_curves_plot_each_block_size_against_its_start(distances):
    ns = [1, 3, 5]
    ax = kit.experiments.plots.distance_curves(distances, ns)
    table = distances.by_block()
    assert [line.get_label() for line in ax.lines] == [f"n = {n}" for n in ns]
    for n, line in zip(ns, ax.lines):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(L - n + 1))
        np.testing.assert_array_equal(line.get_ydata(), table[n, : L - n + 1])
    assert not ax.collections  # no standard errors, no bands
    distances.stderr = torch.full_like(distances.matrix, 0.01)
    ax = kit.experiments.plots.distance_curves(distances, ns)
    for n, band in zip(ns, ax.collections):
        vertices = {tuple(np.round(v, 6)) for v in band.get_paths()[0].vertices}
        edges = {(s, round(float(table[n, s] + sign * 1.959964 * 0.01), 6)) for s in range(L - n + 1) for sign in (-1, 1)}
        assert edges <= vertices


def test_figures_draw_on_a_given_axes_and_save_atomically(distances, tmp_path):
    _, (left, right) = plt.subplots(1, 2)
    assert kit.experiments.plots.distance_heatmap(distances, ax=left) is left
    assert kit.experiments.plots.distance_curves(distances, [2], ax=right) is right
    path = kit.experiments.plots.save(left, tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def _cost_rows():
    import pandas as pd

    return pd.DataFrame([
        dict(criterion=s, n=n, healed=h, metric=m, value=v)
        for s, bonus in (("similarity", 0.0), ("heuristic", 1.0))
        for n in (0, 2, 4)
        for h in ((False, True) if n == 2 and s == "similarity" else (False,))
        for m, v in (("val_loss", 3 + n / 10 + bonus - h), ("weight_bytes", 600 - 100 * n), ("decode_spread", 0.1 * (n + 1)),
                     ("decode_tokens_per_s", 100 / (6 - n) if n != 2 else 10.0))  # n = 2 timed slower than n = 0: noise
    ])  # fmt: skip


def test_quality_cost_draws_each_criterion_in_order_of_n_against_an_exact_cost():
    import matplotlib
    import pandas as pd

    comparison = pd.DataFrame({"val_loss": [3.0, 3.4], "weight_bytes": [600, 200], "decode_tokens_per_s": [16.7, 25.0],
                               "decode_spread": [0.2, 0.4]}, index=["original", "healed"])  # fmt: skip
    ax = kit.experiments.plots.quality_cost(_cost_rows(), "val_loss", comparison=comparison)
    drawn = {c.get_label(): c.lines[0] for c in ax.containers}
    xy = {name: (list(line.get_xdata()), list(line.get_ydata())) for name, line in drawn.items()}
    assert xy["similarity"] == ([1.0, 400 / 600, 200 / 600], [3.0, 3.2, 3.4]) and xy["heuristic"][1] == [4.0, 4.2, 4.4]
    assert xy["similarity, healed"] == ([400 / 600], [2.2]) and drawn["similarity, healed"].get_linestyle() == "--"
    assert xy["original"] == ([1.0], [3.0]) and xy["healed"] == ([200 / 600], [3.4])  # the checkpoints' stars
    assert drawn["healed"].get_marker() == "*" and drawn["healed"].get_linestyle() == "None"
    assert matplotlib.colors.to_hex(drawn["healed"].get_color()) == kit.experiments.plots.style("healed")["color"]
    assert ax.get_xlabel() == "fraction of the unpruned model's weight bytes" and not ax.texts  # no labels to overlap
    speed = kit.experiments.plots.quality_cost(_cost_rows(), "val_loss", cost="decode_tokens_per_s")
    (similarity,) = [c for c in speed.containers if c.get_label() == "similarity"]
    assert list(similarity.lines[0].get_xdata()) == [100 / 6, 10.0, 100 / 2]  # in order of n, not of speed
    (bars,) = similarity.lines[2]
    halves = [round((seg[1][0] - seg[0][0]) / 2, 6) for seg in bars.get_segments()]
    assert halves == [round(100 / 6 * 0.1 / 2, 6), round(10.0 * 0.3 / 2, 6), round(50 * 0.5 / 2, 6)]  # half the spread each side
    assert speed.get_xlabel() == "decode speed (tokens/s)"
    with pytest.raises(ValueError, match="InferenceCost"):
        kit.experiments.plots.quality_cost(_cost_rows().query("metric == 'val_loss'"), "val_loss")
    with pytest.raises(ValueError, match="no column \\['mmlu'\\]"):
        kit.experiments.plots.quality_cost(_cost_rows().replace("val_loss", "mmlu"), "mmlu", comparison=comparison)
    axes = kit.experiments.plots.quality_cost_figure(_cost_rows(), ["val_loss"])
    assert axes.shape == (1, 2) and [ax.get_xlabel() for ax in axes[0]] == [ax.get_xlabel(), "decode speed (tokens/s)"]
    assert kit.experiments.plots.quality_cost_figure(_cost_rows(), ["val_loss"], costs=("decode_tokens_per_s",)).shape == (1, 1)
    plt.close("all")


def test_criteria_figures_draw_the_comparison(distances):
    import pandas as pd

    from kit.choose.oracle import Ablation

    comparison = pd.DataFrame({"n": [1, 2, 1, 2], "criterion": ["angular_last"] * 2 + ["heuristic"] * 2,
                               "regret": [0.0, 0.5, 1.0, 2.0]})  # fmt: skip
    ax = kit.experiments.plots.regret_plot(comparison)
    drawn = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()[:2]]  # one line per criterion
    assert drawn == [([1, 2], [0.0, 0.5]), ([1, 2], [1.0, 2.0])]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["angular_last", "heuristic"]
    loss = np.arange((L + 1) ** 2, dtype=float).reshape(L + 1, L + 1)
    ax = kit.experiments.plots.distance_vs_loss(distances, Ablation(loss, loss), ns=[1, 3])
    table = distances.by_block()
    points = ax.collections[1].get_offsets()  # n = 3
    np.testing.assert_allclose(points, np.column_stack([table[3, : L - 2], loss[3, : L - 2]]), rtol=1e-6)


def test_heatmap_circles_the_blocks_within_noise_of_the_best(distances):
    distances.stderr = torch.full_like(distances.matrix, 0.04)
    ax = kit.experiments.plots.distance_heatmap(distances, mark_best=False, mark_noise=True)
    (line,) = ax.lines
    expected = {(start, n) for n in range(1, L) for start in range(L + 1 - n) if distances.within_noise(n)[start]}
    assert set(zip(line.get_xdata(), line.get_ydata())) == expected
    assert len(expected) > L - 1  # more than the best block of each row


def _sweep_rows(points: dict[str, int], metric="recall"):
    import pandas as pd

    return pd.DataFrame([
        dict(criterion=s, n=n, fraction=n / 10, healed=False, metric=metric, value=0.5 - n / 20, ci_low=0.4 - n / 20,
             ci_high=0.7 - n / 20)
        for s, count in points.items() for n in range(count)
    ])  # fmt: skip


def test_sweep_plot_joins_three_or_more_points_and_never_one_or_two():
    table = _sweep_rows({"similarity": 3, "heuristic": 2})
    ax = kit.experiments.plots.sweep_plot(table, "recall", chance=1 / 6)
    curve, pair = (next(line for line in ax.lines if line.get_label() == label) for label in ("similarity", "heuristic"))
    assert curve.get_linestyle() == "-" and curve.get_marker() == "o"
    assert list(curve.get_xdata()) == [0.0, 0.1, 0.2] and list(curve.get_ydata()) == [0.5, 0.45, 0.4]
    assert pair.get_linestyle() == "None" and pair.get_marker() == "s"  # two points: markers only, no line
    assert list(pair.get_xdata()) == [0.0, 0.1] and list(pair.get_ydata()) == [0.5, 0.45]
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]  # the curve's band only
    assert {(0.2, 0.3), (0.2, 0.6)} <= {tuple(np.round(v, 6)) for v in band.get_paths()[0].vertices}
    assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib.colors.to_rgb(curve.get_color()))
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]  # the pair's error bars
    assert [np.round(segment, 6).tolist() for segment in bars.get_segments()] == [[[0.0, 0.4], [0.0, 0.7]], [[0.1, 0.35], [0.1, 0.65]]]
    single = kit.experiments.plots.sweep_plot(_sweep_rows({"similarity": 1}).drop(columns=["ci_low", "ci_high"]), "recall")
    (point,) = [line for line in single.lines if line.get_label() == "similarity"]
    assert point.get_linestyle() == "None" and not single.collections
    with pytest.raises(ValueError, match="metrics present: \\['recall'\\]"):
        kit.experiments.plots.sweep_plot(table, "boolq")
    plt.close("all")


def test_sweep_figure_has_a_panel_per_metric_and_a_row_per_criterion():
    import pandas as pd

    table = pd.concat([_sweep_rows({"similarity": 3, "heuristic": 3}), _sweep_rows({"similarity": 3, "heuristic": 3}, "loss")])
    table["chance"] = np.where(table["metric"] == "recall", 0.25, np.nan)  # what accuracy rows carry
    axes = kit.experiments.plots.sweep_figure(table, ["recall", "loss"])
    assert axes.shape == (1, 2) and [ax.get_ylabel() for ax in axes[0]] == ["in-context recall (accuracy)", "loss"]
    assert [line.get_label() for line in axes[0, 0].lines] == ["similarity", "heuristic", "chance"]
    assert "chance" not in [line.get_label() for line in axes[0, 1].lines]
    healed = table.assign(healed=table["n"] % 2 == 1)
    axes = kit.experiments.plots.sweep_figure(healed, ["recall", "loss"], hue="healed", rows="criterion")
    assert axes.shape == (2, 2) and axes[1, 0].get_title() == "criterion = heuristic"
    drawn = {line.get_label(): list(line.get_ydata()) for line in axes[1, 0].lines if not line.get_label().startswith("_")}
    assert drawn == {"unhealed": [0.5, 0.4], "healed": [0.45], "chance": [0.25, 0.25]}  # n = 0, 2 unhealed; n = 1 healed
    plt.close("all")


def test_losses_bar_draws_each_normalised_loss_with_its_interval():
    from kit.evaluate.loss import LossResult

    losses = {"original": LossResult(2.0, 0.2, 100, 0.1), "pruned": LossResult(3.0, 0.3, 100, 0.2)}
    ax = kit.experiments.plots.losses_bar(losses, title="layers 3-8 removed")
    assert [p.get_height() for p in ax.patches] == [0.2, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["original", "pruned"] and ax.get_title() == "layers 3-8 removed"
    (bars,) = ax.collections
    halves = [round((s[1][1] - s[0][1]) / 2, 6) for s in bars.get_segments()]
    assert halves == [round(1.959964 * 0.1 * 0.1, 6), round(1.959964 * 0.2 * 0.1, 6)]  # stderr scaled by 1 / log(vocab)
    plt.close("all")


def test_one_colour_and_marker_per_criterion_and_checkpoint_in_every_figure():
    import pandas as pd

    assert kit.experiments.plots.style("similarity") == kit.experiments.plots.style("angular_last")  # the similarity criterion chooses by the paper's metric
    named = [name for name in kit.experiments.plots.STYLES if name != "angular_last"]
    assert len({kit.experiments.plots.STYLES[name] for name in named}) == len(named)  # otherwise all distinct
    assert kit.experiments.plots.style(True) == kit.experiments.plots.style("healed") and kit.experiments.plots.style(np.bool_(False)) == kit.experiments.plots.style("unhealed")

    def colours(artists):
        return {a.get_label(): (matplotlib.colors.to_hex(a.get_color()), a.get_marker()) for a in artists}

    import matplotlib

    expected = {name: tuple(kit.experiments.plots.style(name).values()) for name in ("similarity", "heuristic", "healed", "unhealed")}
    sweep = colours(kit.experiments.plots.sweep_plot(_sweep_rows({"similarity": 3, "heuristic": 3}), "recall", chance=0.2).lines)
    assert {k: sweep[k] for k in ("similarity", "heuristic")} == {k: expected[k] for k in ("similarity", "heuristic")}
    healed = colours(kit.experiments.plots.sweep_plot(_sweep_rows({"similarity": 4}).assign(healed=lambda t: t["n"] > 1), "recall", hue="healed").lines)
    assert {k: healed[k] for k in ("healed", "unhealed")} == {k: expected[k] for k in ("healed", "unhealed")}
    cost = {c.get_label(): (matplotlib.colors.to_hex(c.lines[0].get_color()), c.lines[0].get_marker())
            for c in kit.experiments.plots.quality_cost(_cost_rows(), "val_loss").containers}
    assert cost["similarity"] == expected["similarity"] and cost["heuristic"] == expected["heuristic"]
    criteria = ["angular_last", "angular_all", "block_influence", "heuristic", "loss"]
    table = pd.DataFrame([dict(n=n, criterion=c, regret=float(n)) for c in criteria for n in (1, 2)])
    regret = kit.experiments.plots.regret_plot(table)
    for criterion, (line, text) in zip(criteria, zip(regret.get_legend().get_lines(), regret.get_legend().get_texts())):
        assert text.get_text() == criterion
        assert (matplotlib.colors.to_hex(line.get_color()), line.get_marker()) == tuple(kit.experiments.plots.style(criterion).values())
    plt.close("all")


RAW_NAMES = {"fraction", "n", "value", "regret", "val_loss_norm", "decode_tokens_per_s", "weight_bytes", "recall", "angular_last"}


def _budget_rows():
    import pandas as pd

    point = dict(unit="block", criterion="similarity", n=1, removed="layer 3", chance=np.nan, outcomes=None, per_text=None)
    return pd.DataFrame([{**point, "budget": b, "fraction": b, "metric": "val_loss", "value": 2 + b, "ci_low": 1.9 + b, "ci_high": 2.1 + b}
                         for b in (0.0, 0.1)])  # fmt: skip


def test_every_figure_labels_its_axes_in_words(distances):
    import pandas as pd

    from kit.choose.oracle import Ablation
    from kit.evaluate.loss import LossResult

    loss = np.arange((L + 1) ** 2, dtype=float).reshape(L + 1, L + 1)
    criteria = pd.DataFrame({"n": [1, 2], "criterion": ["loss", "loss"], "regret": [0.0, 0.1]})
    heatmap = kit.experiments.plots.distance_heatmap(distances)
    figures = {
        "distance_heatmap": (heatmap, "first layer of the block (start)", "block size n"),
        "distance_curves": (kit.experiments.plots.distance_curves(distances, [1]), "first layer of the block (start)",
                            "angular distance, last token (arccos(cos) / π)"),
        "sweep_plot": (kit.experiments.plots.sweep_plot(_sweep_rows({"similarity": 3}), "recall"), "fraction of layers dropped",
                       "in-context recall (accuracy)"),
        "losses_bar": (kit.experiments.plots.losses_bar({"original": LossResult(2.0, 0.2, 10, 0.1)}), "", "validation loss / log(vocabulary size)"),
        "heal_curve": (kit.experiments.plots.heal_curve({"train": [{"step": 1, "loss": 2.0}]}), "optimiser step", "loss (nats per token)"),
        "quality_cost": (kit.experiments.plots.quality_cost(_cost_rows(), "val_loss"), "fraction of the unpruned model's weight bytes",
                         "validation loss (nats per token)"),
        "regret_plot": (kit.experiments.plots.regret_plot(criteria), "block size n (layers removed)", "regret (nats per token, symlog)"),
        "distance_vs_loss": (kit.experiments.plots.distance_vs_loss(distances, Ablation(loss, loss), ns=[1]),
                             "angular distance, last token (arccos(cos) / π)", "held-out loss without the block (nats per token)"),
        "budget_plot": (kit.experiments.plots.budget_plot(_budget_rows(), "val_loss"), "fraction of the parameters removed",
                        "validation loss (nats per token)"),
        "heal_compare_figure": (kit.experiments.plots.heal_compare_figure(pd.DataFrame(
            {"n": [4] * 3, "method": ["none"] * 3, "metric": ["val_loss", "kl", "recall"], "value": [3.0, 0.5, 0.4],
             "ci_low": [2.9, 0.4, 0.2], "ci_high": [3.1, 0.6, 0.6], "cpu_s": [0.0] * 3})),
            "healing cost (CPU seconds)", "held-out loss (nats / token)"),
    }  # fmt: skip
    drawn = {name: (ax.get_xlabel(), ax.get_ylabel()) for name, (ax, *_) in figures.items()}
    assert drawn == {name: tuple(labels) for name, (_, *labels) in figures.items()}
    assert heatmap.figure.axes[-1].get_ylabel() == "angular distance, last token (arccos(cos) / π)"  # the colour bar
    assert not {label for pair in drawn.values() for label in pair} & RAW_NAMES
    public = {name for name, f in vars(kit.experiments.plots).items() if callable(f) and getattr(f, "__module__", "") == "kit.experiments.plots"}
    drawers = public - {"save", "style", "label", "sweep_figure", "quality_cost_figure", "budget_figure"} - {n for n in public if n.startswith("_")}
    assert drawers == set(figures), "every figure function is checked here"
    plt.close("all")
