"""Notebook 02 under papermill with smoke parameters, after notebook 01, in the same run folder."""

import pytest
import yaml
from conftest import SMOKE_PARAMETERS, assert_redrawn
from papermill.exceptions import PapermillExecutionError
from transformers import AutoModelForCausalLM, AutoTokenizer

import kit
from kit.core.artifacts import read_json
from kit.experiments.reports import execute

PARAMETERS = SMOKE_PARAMETERS["02_select_and_prune"]


@pytest.fixture(scope="module")
def run(notebook_run):
    return notebook_run("02_select_and_prune")


def test_selection_is_the_scans_best_block(run):
    distances = kit.Distances.load(run / "distances.safetensors")
    best = distances.best_block(PARAMETERS["N"])
    selection = read_json(run / "selection.json")
    assert selection == {
        "start": best.start, "n": best.n, "distance": pytest.approx(best.distance), "source": "similarity",
        "model": distances.meta["model"],
    }  # fmt: skip
    assert kit.Selection.load(run / "selection.json").block == kit.Block(best.start, best.n, pytest.approx(best.distance))


def test_pruned_checkpoint_reproduces_the_reported_loss(run):
    selection, losses = read_json(run / "selection.json"), read_json(run / "losses.json")
    num_layers = kit.Distances.load(run / "distances.safetensors").num_layers
    model = AutoModelForCausalLM.from_pretrained(run / "pruned").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "pruned")
    assert model.config.num_hidden_layers == num_layers - selection["n"]
    assert model.config.pruned_blocks == [[selection["start"], selection["n"]]]
    texts = kit.loaders.data.corpus("validation")[: PARAMETERS["N_VAL_TEXTS"]]
    again = kit.evaluate.validation_loss(model, tokenizer, texts, max_length=PARAMETERS["MAX_LENGTH"])
    assert again.loss == pytest.approx(losses["pruned"]["loss"], rel=1e-4)
    assert again.tokens == losses["pruned"]["tokens"] == losses["original"]["tokens"]
    assert losses["block"] == selection


def test_mergekit_recipe_keeps_the_other_layers(run):
    selection = read_json(run / "selection.json")
    num_layers = kit.Distances.load(run / "distances.safetensors").num_layers
    recipe = yaml.safe_load((run / "mergekit.yaml").read_text())
    kept = [i for s in recipe["slices"] for i in range(*s["sources"][0]["layer_range"])]
    start, end = selection["start"], selection["start"] + selection["n"]
    assert kept == [i for i in range(num_layers) if not start <= i < end]


def test_missing_scan_names_notebook_01(tmp_path):
    with pytest.raises(PapermillExecutionError, match="01_similarity.ipynb"):
        execute("02_select_and_prune", output_dir=tmp_path, parameters={**PARAMETERS, "RUN": "empty", "RUNS_ROOT": str(tmp_path)})


def test_figures_draw_the_selection_and_the_losses(run, tmp_path):
    from kit.evaluate.loss import LossResult

    distances, selection = kit.Distances.load(run / "distances.safetensors"), kit.Selection.load(run / "selection.json")
    picker = kit.experiments.widgets.BlockPicker(distances, n=PARAMETERS["N"], start=None, criterion="similarity")  # as the notebook builds it
    assert_redrawn(run / "selection.png", picker.plot(), tmp_path)
    losses, block = read_json(run / "losses.json"), selection.block
    bars = {"original": LossResult(**losses["original"]), f"pruned (-{block.n} layers)": LossResult(**losses["pruned"])}
    ax = kit.experiments.plots.losses_bar(bars, title=f"layers {block.start}-{block.end - 1} removed")
    assert [p.get_height() for p in ax.patches] == [losses["original"]["normalized"], losses["pruned"]["normalized"]]
    assert_redrawn(run / "losses.png", ax, tmp_path)