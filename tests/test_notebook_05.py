"""Notebook 05 runs headless with small parameters (it needs no other notebook) and leaves the
scans, both oracles, the comparison and its figures in its run folder."""

import numpy as np
import pandas as pd
import pytest
from conftest import SMOKE_PARAMETERS

from kit.oracle import Ablation
from kit.reports import execute
from kit.similarity import Distances


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    execute("05_criteria", output_dir=root, parameters={**SMOKE_PARAMETERS["05_criteria"], "RUN": "smoke", "RUNS_ROOT": str(root)})
    return root / "smoke"


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
    assert all(best[n] == np.nanmin(held_out.loss[n]) for n in smoke["NS"])
    for metric in smoke["METRICS"]:
        assert Distances.load(run / f"distances_{metric}.safetensors").meta["metric"] == metric
    for figure in ("regret.png", "distance_vs_loss.png"):
        assert (run / figure).stat().st_size > 0
