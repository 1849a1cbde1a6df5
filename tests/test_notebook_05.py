"""Notebook 05 runs headless with small parameters (it needs no other notebook; here it runs in the
smoke run's folder after 01-04) and leaves the scans, both oracles, the comparison and its figures there."""

import numpy as np
import pandas as pd
import pytest
from conftest import SMOKE_PARAMETERS, assert_redrawn

import kit
from kit.choose.oracle import Ablation
from kit.core.artifacts import read_json
from kit.scan.distances import Distances


@pytest.fixture(scope="module")
def run(notebook_run):
    return notebook_run("05_criteria")


def test_notebook_05_compares_every_criterion_on_held_out_texts(run):
    smoke = SMOKE_PARAMETERS["05_criteria"]
    table = pd.read_csv(run / "criteria.csv")
    assert set(table["criterion"]) == {*smoke["METRICS"], "heuristic", "loss"}
    assert sorted(set(table["n"])) == smoke["NS"] and (table["regret"] >= 0).all()
    held_out = Ablation.load(run / "oracle_held_out.safetensors")
    calibration = Ablation.load(run / "oracle_calibration.safetensors")
    assert held_out.ns == calibration.ns == smoke["NS"] and held_out.meta["model"] == "smollm2-135m"
    assert not np.allclose(held_out.loss[0], calibration.loss[0]), "held-out texts differ from calibration texts"
    best = table.groupby("n")["best_loss"].first()
    assert all(best[n] == pytest.approx(np.nanmin(held_out.loss[n]), rel=1e-15) for n in smoke["NS"])  # CSV: 1 ulp
    for metric in smoke["METRICS"]:
        assert Distances.load(run / f"distances_{metric}.safetensors").meta["metric"] == metric
    step = read_json(run / "manifest.json")["05_criteria"]
    assert step["config"]["ns"] == smoke["NS"] and step["model"] == "smollm2-135m" and step["layers"] == 30


def test_notebook_05_figures_draw_the_saved_comparison(run, tmp_path):
    smoke = SMOKE_PARAMETERS["05_criteria"]
    table = pd.read_csv(run / "criteria.csv")
    ax = kit.experiments.plots.regret_plot(table)
    drawn = {(float(x), float(y)) for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert drawn == set(zip(table["n"].astype(float), table["regret"])) and len(ax.get_lines()) >= table["criterion"].nunique()
    assert_redrawn(run / "regret.png", ax, tmp_path)
    scan, held_out = Distances.load(run / f"distances_{smoke['METRICS'][0]}.safetensors"), Ablation.load(run / "oracle_held_out.safetensors")
    ax = kit.experiments.plots.distance_vs_loss(scan, held_out, ns=smoke["SCATTER_NS"])
    assert [len(c.get_offsets()) for c in ax.collections] == [scan.num_layers - n + 1 for n in smoke["SCATTER_NS"]]  # every start
    assert_redrawn(run / "distance_vs_loss.png", ax, tmp_path)
