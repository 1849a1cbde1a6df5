"""Notebook 01 runs headless with small parameters and leaves a usable scan in its run folder."""

import pandas as pd
from conftest import SMOKE_PARAMETERS

from kit.artifacts import read_json
from kit.similarity import Distances


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
    for figure in ("heatmap.png", "curves.png"):
        assert (run / figure).stat().st_size > 0
    step = read_json(run / "manifest.json")["01_similarity"]
    assert step["config"]["n_texts"] == smoke["N_TEXTS"] and step["model"] == "smollm2-135m"
