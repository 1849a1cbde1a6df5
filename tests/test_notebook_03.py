"""Notebook 03 under papermill with smoke parameters, after notebooks 01 and 02, in the same run folder."""

import math

import pytest
import torch
from conftest import SMOKE_PARAMETERS, assert_redrawn, printed
from papermill.exceptions import PapermillExecutionError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import kit
from kit.core.artifacts import read_json
from kit.experiments.reports import execute

PARAMETERS = SMOKE_PARAMETERS["03_heal"]


@pytest.fixture(scope="module")
def run(notebook_run):
    return notebook_run("03_heal")


def test_history_has_every_logged_step_and_validation(run):
    history = read_json(run / "heal_history.json")
    steps = list(range(1, PARAMETERS["STEPS"] + 1))
    assert [e["step"] for e in history["train"]] == steps
    assert [e["step"] for e in history["validation"]] == [0] + steps  # before training, then EVAL_EVERY = 1
    assert all(math.isfinite(e["loss"]) for e in history["train"] + history["validation"])
    assert read_json(run / "manifest.json")["03_heal"]["config"]["steps"] == PARAMETERS["STEPS"]


def test_heal_curve_draws_the_saved_history(run, tmp_path):
    history = read_json(run / "heal_history.json")
    ax = kit.experiments.plots.heal_curve(history)
    assert [len(line.get_xdata()) for line in ax.lines] == [len(history["train"]), len(history["validation"])]
    assert_redrawn(run / "heal_curve.png", ax, tmp_path)


def test_merged_checkpoint_is_the_pruned_model_plus_the_adapter(run):
    merged = AutoModelForCausalLM.from_pretrained(run / "healed_merged")  # plain checkpoint: no peft
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    adapter = load_file(run / "healed" / "adapter" / "adapter_model.safetensors")
    assert merged.config.num_hidden_layers == pruned.config.num_hidden_layers
    changed = {name for name, w in merged.state_dict().items() if not torch.equal(w, pruned.state_dict()[name])}
    adapted = {name.removeprefix("base_model.model.").replace(".lora_A", "") for name in adapter if ".lora_A" in name}
    assert changed <= adapted and changed  # only MLP projections moved
    targets = tuple("." + target for target in kit.core.layers.mlp_modules(merged))  # peft matches them as name suffixes
    assert all(name.removesuffix(".weight").endswith(targets) for name in adapted)


def test_losses_of_original_pruned_and_healed(run):
    losses = read_json(run / "heal_losses.json")
    total, n = kit.Distances.load(run / "distances.safetensors").num_layers, read_json(run / "selection.json")["n"]
    assert {name: loss["layers"] for name, loss in losses.items()} == {"original": total, "pruned": total - n, "healed": total - n}
    assert losses["pruned"]["val_loss"] > losses["original"]["val_loss"]
    model, tokenizer = kit.load_model(str(run / "healed_merged"))
    texts = kit.loaders.data.corpus("validation")[: PARAMETERS["N_VAL_TEXTS"]]
    again = kit.evaluate.validation_loss(model, tokenizer, texts, max_length=PARAMETERS["SEQ_LEN"])
    assert again.loss == pytest.approx(losses["healed"]["val_loss"], rel=1e-4)
    assert again.normalized == pytest.approx(losses["healed"]["val_loss_norm"], rel=1e-4)


def test_missing_pruned_model_names_notebook_02(tmp_path):
    with pytest.raises(PapermillExecutionError, match="02_select_and_prune.ipynb"):
        execute("03_heal", output_dir=tmp_path, parameters={**PARAMETERS, "RUN": "empty", "RUNS_ROOT": str(tmp_path)})


def test_the_healed_model_is_freed_before_the_comparison_loads_others(run):
    """compare warns when tensors of an earlier step are still referenced as it loads (kit.experiments.sweep.compare)."""
    assert "still referenced" not in printed(run.parent / "03_heal.ipynb")
