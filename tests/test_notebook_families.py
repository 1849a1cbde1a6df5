"""Notebooks 01-05 on a tiny model that is both an MoE and a hybrid (conftest.TINY_ARCHITECTURE, Granite 4:
Mamba 2 and attention layers alternate, every layer's MLP routes over fused experts beside a shared MLP), the
second run of every notebook (conftest.tiny_notebook_run): every notebook runs through papermill, and its
artifacts agree with the model and with one another. The exactness tests cover the pure MoE (qwen3_moe) and
every other kit.testing.TINY_ARCHITECTURES family."""

import pandas as pd
import pytest
import torch
from conftest import TINY_LAYERS as LAYERS
from conftest import TINY_PARAMETERS as PARAMETERS
from transformers import AutoModelForCausalLM, AutoTokenizer

import kit
from kit.core.artifacts import read_json
from kit.core.layers import caches_keys
from kit.experiments.reports import NOTEBOOKS


@pytest.fixture(scope="module")
def family_run(tiny_model_folder, tiny_notebook_run):
    """(model folder, run folder) of notebooks 01-05 on the tiny MoE-and-hybrid model."""
    return tiny_model_folder, tiny_notebook_run("05_criteria")


def _kv_layers(config) -> int:
    """Layers that cache keys and values: the attention layers of a hybrid, every layer otherwise."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return sum(map(caches_keys, kinds))


def test_notebooks_run_on_the_family_and_their_artifacts_agree(family_run):
    folder, run = family_run
    original = AutoModelForCausalLM.from_pretrained(folder)
    manifest = read_json(run / "manifest.json")
    assert set(NOTEBOOKS) <= set(manifest) and manifest["01_similarity"]["layers"] == LAYERS

    # 01: the scan of every residual position; 02: its similarity block, dropped in a checkpoint of the same family
    distances = kit.Distances.load(run / "distances.safetensors")
    assert distances.matrix.shape == (LAYERS + 1, LAYERS + 1) and distances.meta["model"] == str(folder)
    selection, n = read_json(run / "selection.json"), PARAMETERS["02_select_and_prune"]["N"]
    assert (selection["start"], selection["n"]) == (distances.best_block(n).start, n)
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned").eval()
    kept = [i for i in range(LAYERS) if not selection["start"] <= i < selection["start"] + n]
    assert pruned.config.model_type == original.config.model_type and pruned.config.pruned_blocks == [[selection["start"], n]]
    assert kit.core.layers.num_layers(pruned) == pruned.config.num_hidden_layers == len(kept)
    kinds = getattr(original.config, "layer_types", None)  # the hybrid's Mamba and attention layers
    assert getattr(pruned.config, "layer_types", None) == (kinds and [kinds[i] for i in kept])
    settings = PARAMETERS["02_select_and_prune"]
    texts = kit.loaders.data.corpus("validation")[: settings["N_VAL_TEXTS"]]
    tokenizer = AutoTokenizer.from_pretrained(run / "pruned")
    again = kit.evaluate.validation_loss(pruned, tokenizer, texts, max_length=settings["MAX_LENGTH"])
    assert again.loss == pytest.approx(read_json(run / "losses.json")["pruned"]["loss"], rel=1e-4)

    # 03: healing moved the MLP weights (the routed experts' fused weights too) and nothing else
    merged = AutoModelForCausalLM.from_pretrained(run / "healed_merged")
    changed = {name for name, w in merged.state_dict().items() if not torch.equal(w, pruned.state_dict()[name])}
    modules = tuple(f".{target}.weight" for target in kit.core.layers.mlp_modules(pruned))
    fused = tuple(f".{target}" for target in kit.core.layers.mlp_parameters(pruned))  # routed experts' 3-d weights
    assert fused and all(name.endswith(modules + fused) for name in changed)
    assert any(name.endswith(fused) for name in changed) and (not modules or any(name.endswith(modules) for name in changed))
    layers_of = {name: loss["layers"] for name, loss in read_json(run / "heal_losses.json").items()}
    assert layers_of == {"original": LAYERS, "pruned": len(kept), "healed": len(kept)}

    # 04: the pruned model caches keys and values of its kept attention layers only
    table = pd.read_csv(run / "comparison.csv", index_col="model")
    assert table["layers"].tolist() == [LAYERS, len(kept), len(kept), len(kept)] and (table["decode_tokens_per_s"] > 0).all()
    kv = table["kv_bytes_per_token"]
    assert kv["pruned"] * _kv_layers(original.config) == kv["original"] * _kv_layers(pruned.config)
    sweep = pd.read_csv(run / "sweep.csv")
    assert set(sweep["criterion"]) == set(kit.experiments.sweep.PAPER_CRITERIA) and {"recall", "val_loss"} <= set(sweep["metric"])

    # 05: every criterion judged on held-out texts, at every block size asked for
    criteria = pd.read_csv(run / "criteria.csv")
    assert sorted(set(criteria["n"])) == PARAMETERS["05_criteria"]["NS"] and (criteria["regret"] >= 0).all()
    assert {"heuristic", "loss", *PARAMETERS["05_criteria"]["METRICS"]} == set(criteria["criterion"])
