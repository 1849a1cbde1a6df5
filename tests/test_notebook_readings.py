"""Each notebook's closing reading, run twice through papermill (the embedded model with smoke
parameters, a tiny random model with other settings): it shows what kit.experiments.readings reads off the run's
artifacts, every number it states is one of those artifacts' numbers, and the two runs read differently."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_ARCHITECTURE, artifact_numbers, reading_numbers

import kit
from kit.core.artifacts import read_json
from kit.core.stats import paired_ratio_difference
from kit.experiments import readings

READ = ["01_similarity", "02_select_and_prune", "03_heal", "04_compare", "05_criteria", "06_granularity"]


def shown(run, name: str) -> str:
    """The Markdown the executed notebook's last cell displayed."""
    nb = json.loads((run.parent / f"{name}.ipynb").read_text())
    (output,) = nb["cells"][-1]["outputs"]
    return "".join(output["data"]["text/markdown"])


def derived(run, name: str) -> list[float]:
    """Values a reading computes from its artifacts, computed here from them directly."""
    if name == "02_select_and_prune":
        losses = read_json(run / "losses.json")
        block, before, after = losses["block"], losses["original"], losses["pruned"]
        sides = [np.stack([side["text_losses"], side["text_tokens"]], 1) for side in (after, before)]
        change = paired_ratio_difference(*sides)  # its interval: the kit's bootstrap; its value, computed here
        assert change.value == pytest.approx((sum(after["text_losses"]) - sum(before["text_losses"])) / sum(before["text_tokens"]))
        return [block["start"] + block["n"] - 1, change.value, change.low, change.high]
    if name == "03_heal":
        losses, selection = read_json(run / "heal_losses.json"), read_json(run / "selection.json")
        o, p, h = (losses[k]["val_loss"] for k in ("original", "pruned", "healed"))
        return [(p - h) / (p - o), selection["start"] + selection["n"] - 1]
    if name == "04_compare":
        comparison, results = pd.read_csv(run / "comparison.csv"), pd.read_csv(run / "sweep.csv")
        loss = results[results["metric"] == "val_loss_norm"].set_index(["criterion", "n", "healed"])["value"]
        shares = [(loss[s, n, False] - loss[s, n, True]) / (loss[s, n, False] - loss[s, 0, False]) for s, n, h in loss.index if h]
        return [*(comparison["weight_bytes"] / comparison["weight_bytes"].iloc[0]), *shares]
    if name == "05_criteria":
        return list(pd.read_csv(run / "criteria.csv").groupby("criterion")["regret"].mean())
    return []


def counts(run) -> list[float]:
    """'k of m' statements count rows of the run's tables: any whole number up to the longest table."""
    return list(range(max(len(pd.read_csv(path)) for path in run.glob("*.csv")) + 1))


@pytest.mark.parametrize("name", READ)
def test_reading_states_the_numbers_of_its_run(name, notebook_run, tiny_notebook_run):
    texts = []
    for run in (notebook_run(name), tiny_notebook_run(name)):
        text = readings.reading(run, name).markdown
        assert shown(run, name) == text  # the notebook displays what the artifacts say
        numbers = reading_numbers(text)
        unexplained = set(numbers) - artifact_numbers(run, derived(run, name) + counts(run))
        assert numbers and not unexplained, f"{name}: {sorted(unexplained)} are in no artifact of {run}"
        texts.append(text)
    assert texts[0] != texts[1]
    assert "smollm2-135m" in texts[0].splitlines()[0] and f"tiny-{TINY_ARCHITECTURE}" in texts[1].splitlines()[0]


def test_mmlu_is_swept_by_default_only_above_chance(notebook_run, tiny_notebook_run):
    tiny = tiny_notebook_run("04_compare")
    unpruned = pd.read_csv(tiny / "unpruned.csv").set_index("metric").loc["mmlu"]
    swept = "mmlu" in set(pd.read_csv(tiny / "sweep.csv")["metric"])
    assert swept == (unpruned["ci_low"] > 0.25)  # SWEEP_MMLU None: the rule decides
    assert read_json(tiny / "manifest.json")["sweep"]["mmlu"] == swept
    smoke = notebook_run("04_compare")  # SWEEP_MMLU True forces it
    assert "mmlu" in set(pd.read_csv(smoke / "sweep.csv")["metric"])


def test_every_notebook_records_its_step(notebook_run, tiny_notebook_run):
    for run in (notebook_run("05_criteria"), tiny_notebook_run("05_criteria")):
        manifest = read_json(run / "manifest.json")
        steps = {key for step, key in kit.run.MANIFEST_KEYS.items() if step != "heal_compare"}  # of notebooks 01-06 (04: sweep, evaluate)
        assert steps <= set(manifest)
        assert all(manifest[name]["seed"] is not None for name in steps)
