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
    ax = kit.plots.distance_heatmap(distances, mark_best=False)
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
    ax = kit.plots.distance_heatmap(distances, highlight=kit.Block(2, 3))
    (line,) = ax.lines
    assert list(line.get_ydata()) == list(range(1, L))
    assert list(line.get_xdata()) == [distances.best_block(n).start for n in range(1, L)]
    (box,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (1.5, 2.5, 1, 1)


def test_heatmap_normalized_rows_span_zero_to_one(distances):
    image = kit.plots.distance_heatmap(distances, normalize_rows=True).images[0].get_array()
    for row in image:  # every row n <= L-1 has at least two blocks
        assert row.min() == pytest.approx(0) and row.max() == pytest.approx(1)


def test_curves_plot_each_block_size_against_its_start(distances):
    ns = [1, 3, 5]
    ax = kit.plots.distance_curves(distances, ns)
    table = distances.by_block()
    assert [line.get_label() for line in ax.lines] == [f"n = {n}" for n in ns]
    for n, line in zip(ns, ax.lines):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(L - n + 1))
        np.testing.assert_array_equal(line.get_ydata(), table[n, : L - n + 1])
    assert not ax.collections  # no standard errors, no bands
    distances.stderr = torch.full_like(distances.matrix, 0.01)
    ax = kit.plots.distance_curves(distances, ns)
    for n, band in zip(ns, ax.collections):
        vertices = {tuple(np.round(v, 6)) for v in band.get_paths()[0].vertices}
        edges = {(s, round(float(table[n, s] + sign * 1.959964 * 0.01), 6)) for s in range(L - n + 1) for sign in (-1, 1)}
        assert edges <= vertices


def test_figures_draw_on_a_given_axes_and_save_atomically(distances, tmp_path):
    _, (left, right) = plt.subplots(1, 2)
    assert kit.plots.distance_heatmap(distances, ax=left) is left
    assert kit.plots.distance_curves(distances, [2], ax=right) is right
    path = kit.plots.save(left, tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_quality_cost_draws_each_strategy_and_marks_each_checkpoint():
    import pandas as pd

    rows = [
        dict(strategy=s, n=n, healed=h, metric=m, value=v)
        for s, bonus in (("similarity", 0.0), ("heuristic", 1.0))
        for n in (0, 2, 4)
        for h in ((False, True) if n == 2 and s == "similarity" else (False,))
        for m, v in (("val_loss", 3 + n / 10 + bonus - h), ("decode_tokens_per_s", 100 / (6 - n)))
    ]
    comparison = pd.DataFrame({"val_loss": [3.0, 3.4], "decode_tokens_per_s": [16.7, 25.0]}, index=["original", "pruned"])
    ax = kit.plots.quality_cost(pd.DataFrame(rows), "val_loss", comparison=comparison)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    speeds = [100 / 6, 100 / 4, 100 / 2]
    assert lines["heuristic"] == (speeds, [4.0, 4.2, 4.4]) and lines["similarity"] == (speeds, [3.0, 3.2, 3.4])
    assert lines["similarity, healed"] == ([25.0], [2.2])
    stars = [(c.get_label(), c.get_offsets().tolist()) for c in ax.collections]
    assert stars == [("original", [[16.7, 3.0]]), ("pruned", [[25.0, 3.4]])]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["n=0", "n=2", "n=4"] * 2 + ["n=2"])
    with pytest.raises(ValueError, match="cost_metrics"):
        kit.plots.quality_cost(pd.DataFrame(rows).query("metric == 'val_loss'"), "val_loss")
    with pytest.raises(ValueError, match="no column \\['mmlu'\\]"):
        kit.plots.quality_cost(pd.DataFrame(rows).replace("val_loss", "mmlu"), "mmlu", comparison=comparison)
    plt.close("all")


def test_criteria_figures_draw_the_comparison(distances):
    import pandas as pd

    from kit.oracle import Ablation

    comparison = pd.DataFrame({"n": [1, 2, 1, 2], "criterion": ["angular_last"] * 2 + ["heuristic"] * 2,
                               "regret": [0.0, 0.5, 1.0, 2.0]})  # fmt: skip
    ax = kit.plots.regret_plot(comparison)
    drawn = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()[:2]]  # one line per criterion
    assert drawn == [([1, 2], [0.0, 0.5]), ([1, 2], [1.0, 2.0])]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["angular_last", "heuristic"]
    loss = np.arange((L + 1) ** 2, dtype=float).reshape(L + 1, L + 1)
    ax = kit.plots.distance_vs_loss(distances, Ablation(loss, loss), ns=[1, 3])
    table = distances.by_block()
    points = ax.collections[1].get_offsets()  # n = 3
    np.testing.assert_allclose(points, np.column_stack([table[3, : L - 2], loss[3, : L - 2]]), rtol=1e-6)


def test_heatmap_circles_the_blocks_within_noise_of_the_best(distances):
    distances.stderr = torch.full_like(distances.matrix, 0.04)
    ax = kit.plots.distance_heatmap(distances, mark_best=False, mark_noise=True)
    (line,) = ax.lines
    expected = {(start, n) for n in range(1, L) for start in range(L + 1 - n) if distances.within_noise(n)[start]}
    assert set(zip(line.get_xdata(), line.get_ydata())) == expected
    assert len(expected) > L - 1  # more than the best block of each row


def _sweep_rows(points: dict[str, int], metric="recall"):
    import pandas as pd

    return pd.DataFrame([
        dict(strategy=s, n=n, fraction=n / 10, healed=False, metric=metric, value=0.5 - n / 20, ci_low=0.4 - n / 20,
             ci_high=0.7 - n / 20)
        for s, count in points.items() for n in range(count)
    ])  # fmt: skip


def test_sweep_plot_joins_three_or_more_points_and_never_one_or_two():
    table = _sweep_rows({"similarity": 3, "heuristic": 2})
    ax = kit.plots.sweep_plot(table, "recall", chance=1 / 6)
    curve, pair = (next(line for line in ax.lines if line.get_label() == label) for label in ("similarity", "heuristic"))
    assert curve.get_linestyle() == "-" and curve.get_marker() == "o"
    assert list(curve.get_xdata()) == [0.0, 0.1, 0.2] and list(curve.get_ydata()) == [0.5, 0.45, 0.4]
    assert pair.get_linestyle() == "None" and pair.get_marker() == "o"  # two points: markers only, no line
    assert list(pair.get_xdata()) == [0.0, 0.1] and list(pair.get_ydata()) == [0.5, 0.45]
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]  # the curve's band only
    assert {(0.2, 0.3), (0.2, 0.6)} <= {tuple(np.round(v, 6)) for v in band.get_paths()[0].vertices}
    assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib.colors.to_rgb(curve.get_color()))
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]  # the pair's error bars
    assert [np.round(segment, 6).tolist() for segment in bars.get_segments()] == [[[0.0, 0.4], [0.0, 0.7]], [[0.1, 0.35], [0.1, 0.65]]]
    single = kit.plots.sweep_plot(_sweep_rows({"similarity": 1}).drop(columns=["ci_low", "ci_high"]), "recall")
    (point,) = [line for line in single.lines if line.get_label() == "similarity"]
    assert point.get_linestyle() == "None" and not single.collections
    with pytest.raises(ValueError, match="metrics present: \\['recall'\\]"):
        kit.plots.sweep_plot(table, "boolq")
    plt.close("all")


def test_sweep_figure_has_a_panel_per_metric_and_a_row_per_strategy():
    import pandas as pd

    table = pd.concat([_sweep_rows({"similarity": 3, "heuristic": 3}), _sweep_rows({"similarity": 3, "heuristic": 3}, "loss")])
    table["chance"] = np.where(table["metric"] == "recall", 0.25, np.nan)  # what accuracy rows carry
    axes = kit.plots.sweep_figure(table, ["recall", "loss"])
    assert axes.shape == (1, 2) and [ax.get_ylabel() for ax in axes[0]] == ["recall", "loss"]
    assert [line.get_label() for line in axes[0, 0].lines] == ["similarity", "heuristic", "chance"]
    assert "chance" not in [line.get_label() for line in axes[0, 1].lines]
    healed = table.assign(healed=table["n"] % 2 == 1)
    axes = kit.plots.sweep_figure(healed, ["recall", "loss"], hue="healed", rows="strategy")
    assert axes.shape == (2, 2) and axes[1, 0].get_title() == "strategy = heuristic"
    drawn = {line.get_label(): list(line.get_ydata()) for line in axes[1, 0].lines if not line.get_label().startswith("_")}
    assert drawn == {"False": [0.5, 0.4], "True": [0.45], "chance": [0.25, 0.25]}  # n = 0, 2 unhealed; n = 1 healed
    plt.close("all")


def test_losses_bar_draws_each_normalised_loss_with_its_interval():
    from kit.loss import LossResult

    losses = {"original": LossResult(2.0, 0.2, 100, 0.1), "pruned": LossResult(3.0, 0.3, 100, 0.2)}
    ax = kit.plots.losses_bar(losses, title="layers 3-8 removed")
    assert [p.get_height() for p in ax.patches] == [0.2, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["original", "pruned"] and ax.get_title() == "layers 3-8 removed"
    (bars,) = ax.collections
    halves = [round((s[1][1] - s[0][1]) / 2, 6) for s in bars.get_segments()]
    assert halves == [round(1.959964 * 0.1 * 0.1, 6), round(1.959964 * 0.2 * 0.1, 6)]  # stderr scaled by 1 / log(vocab)
    plt.close("all")
