"""Notebook 07 under papermill on a tiny Llama saved as a local checkpoint (three block sizes, every method,
one or two training steps): its tables, figure and reading agree with each other and with the checkpoints."""

import json

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

import kit
from kit.experiments.reports import execute

PARAMETERS = {"NS": [2, 3, 4], "N_TEXTS": 8, "N_VAL_TEXTS": 4, "MAX_LENGTH": 32, "STEPS": 1, "RECALL_ITEMS": 4, "RECALL_FACTS": 2}
METHODS = {"none", "linear_patch", "replacement_layer", "last_layers", "qlora", "distill"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=8)
    model.save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    execute("07_heal_compare", output_dir=root, parameters={**PARAMETERS, "MODEL": str(root / "tiny-llama"), "RUN": "smoke",
                                                            "RUNS_ROOT": str(root)})  # fmt: skip
    return root / "smoke"


def test_every_method_heals_every_block_size_into_a_plain_checkpoint(run):
    table, refused = pd.read_csv(run / "heal_compare.csv"), json.loads((run / "heal_refused.json").read_text())
    assert set(table["method"]) | {where.split()[1] for where in refused} == METHODS and sorted(set(table["n"])) == PARAMETERS["NS"]
    assert all("starts at layer 0" in why and "linear_patch" in where for where, why in refused.items())  # a random model's
    # scan picks blocks at layer 0, where the linear patch has no layer before the cut
    assert set(table["metric"]) == {"val_loss", "kl", "recall"} and len(table) == 3 * (len(METHODS) * 3 - len(refused))
    for n in PARAMETERS["NS"]:
        for method in METHODS - {where.split()[1] for where in refused if where.startswith(f"n={n} ")}:
            folder = run / "heal_compare" / f"n{n}" / method
            record = json.loads((folder / "healing.json").read_text())
            layers = AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers
            assert layers == 8 - n + (method == "replacement_layer") and record["method"] == method
            cost = table[(table["n"] == n) & (table["method"] == method)]["cpu_s"]
            assert (cost == record["cost"]["cpu_s"]).all()
    none = table[table["method"] == "none"]
    assert (none[none["metric"] == "kl"]["value"] > 0).all()


def test_paired_table_best_table_and_reading_agree(run):
    table, paired, best = (pd.read_csv(run / f"heal_{name}.csv") for name in ("compare", "paired", "best"))
    assert len(paired) == len(table) - 3 * 3 and (paired["ci_low"] <= paired["ci_high"]).all()
    loss = table[table["metric"] == "val_loss"]
    for _, row in best.iterrows():
        assert row["value"] == loss[loss["n"] == row["n"]]["value"].min()
    text = kit.experiments.readings.reading(run, "07_heal_compare").markdown
    assert all(f"n={n}:" in text for n in PARAMETERS["NS"]) and (run / "heal_compare.png").stat().st_size > 0
