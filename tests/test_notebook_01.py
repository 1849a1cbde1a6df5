"""Notebook 01 runs headless with small parameters and leaves a usable scan in its run folder."""

import pandas as pd
from conftest import SMOKE_PARAMETERS, assert_redrawn

import kit
from kit.core.artifacts import read_json
from kit.scan.distances import Distances


def test_notebook_01_writes_the_scan_and_its_figures(notebook_run):
    run = notebook_run("01_similarity")
    distances = Distances.load(run / "distances.safetensors")
    assert distances.matrix.shape == (31, 31)  # SmolLM2-135M: 30 layers
    smoke = SMOKE_PARAMETERS["01_similarity"]
    assert distances.meta["model"] == "smollm2-135m"
    assert distances.meta["n_texts"] == smoke["N_TEXTS"] and distances.meta["max_length"] == smoke["MAX_LENGTH"]
    assert distances.meta["metric"] == "angular_last" and distances.meta["tokens"] == smoke["N_TEXTS"]
    assert distances.stderr.shape == (31, 31) and abs(distances.stability(4).sum() - 1) < 1e-9
    choices = pd.read_csv(run / "choices.csv", index_col="n")
    assert choices.index.tolist() == list(range(1, 30))
    assert [choices.loc[n, "best_start"] for n in choices.index] == [distances.best_block(n).start for n in choices.index]
    step = read_json(run / "manifest.json")["01_similarity"]
    assert step["config"]["n_texts"] == smoke["N_TEXTS"] and step["model"] == "smollm2-135m" and step["layers"] == 30


def test_notebook_01_figures_draw_the_saved_scan(notebook_run, tmp_path):
    run = notebook_run("01_similarity")
    distances = Distances.load(run / "distances.safetensors")
    heatmap = kit.experiments.plots.distance_heatmap(distances, mark_noise=True)
    assert [line.get_label() for line in heatmap.lines] == ["best start per n", "within noise of the best"]
    assert len(heatmap.lines[0].get_xdata()) == distances.num_layers - 1  # one best start per block size
    assert_redrawn(run / "heatmap.png", heatmap, tmp_path)
    ns = kit.experiments.readings.distances_shown(distances.num_layers)
    curves = kit.experiments.plots.distance_curves(distances, ns)
    assert [len(line.get_xdata()) for line in curves.lines] == [distances.num_layers - n + 1 for n in ns]  # every start
    assert_redrawn(run / "curves.png", curves, tmp_path)
