"""The greedy removal (kit.choose.greedy) against the brute-force greedy loop that rebuilds every candidate
model and scores it (kit.testing.reference_greedy), its artifact, and its refusals."""

import numpy as np
import pytest

import kit
from kit.choose.greedy import GreedyRemoval, greedy_removal
from kit.core.block import Layers
from kit.loaders.data import corpus
from kit.testing import reference_greedy

TEXTS = [text[:160] for text in corpus("validation")[:5]]


def _assert_equals_brute_force(model, tokenizer, unit: str, steps: int, batch_size: int):
    found = greedy_removal(model, tokenizer, TEXTS, unit=unit, steps=steps, max_length=24, batch_size=batch_size)
    order, losses, tables = reference_greedy(model, tokenizer, TEXTS, unit=unit, steps=steps, max_length=24, batch_size=batch_size)
    assert found.order == order
    np.testing.assert_allclose(found.losses, losses, rtol=1e-6)  # measured: at most 1.5e-7 on every tiny architecture
    for step, table in tables.items():
        expected = np.full(kit.core.layers.num_layers(model), np.nan)
        expected[list(table)] = list(table.values())
        np.testing.assert_allclose(found.candidates[step], expected, rtol=1e-6)
        runner_up = sorted(table.values())[1]
        assert runner_up - losses[step] > 1e-6 * losses[step], "a near tie: the order would not test the choice"
    unpruned = kit.evaluate.validation_loss(model, tokenizer, TEXTS, max_length=24, batch_size=batch_size)
    assert found.meta["base_loss"] == pytest.approx(unpruned.loss, rel=1e-6) and found.meta["tokens"] == unpruned.tokens
    return found


@pytest.mark.parametrize("unit", ["layers", "attention", "mlp"])
@pytest.mark.parametrize("batch_size", [5, 2])  # one batch (stored inputs kept and updated) and three (stored again)
def test_llama_equals_the_brute_force_greedy(unit, batch_size):
    model, tokenizer = kit.tiny_model("llama", num_layers=6)
    found = _assert_equals_brute_force(model, tokenizer, unit, 4, batch_size)
    assert found.unit == unit and found.first(2) == kit.choose.branches.unit_set(unit, found.order[:2])


@pytest.mark.parametrize("arch", kit.TINY_ARCHITECTURES)  # MoE, MLA, hybrid Mamba, linear attention, multimodal too
def test_every_tiny_architecture_equals_the_brute_force_greedy(arch):
    model, tokenizer = kit.tiny_model(arch, num_layers=4)
    for unit in ("layers", "attention", "mlp"):  # OPT's MLP: its fc1 and fc2 on the layer itself (Middle.mlp)
        _assert_equals_brute_force(model, tokenizer, unit, 2, 2)


def test_save_and_load(tmp_path):
    model, tokenizer = kit.tiny_model("llama", num_layers=4)
    found = greedy_removal(model, tokenizer, TEXTS[:2], unit="mlp", steps=2, max_length=16, model_name="tiny")
    loaded = GreedyRemoval.load(found.save(tmp_path / "greedy.safetensors"))
    assert loaded.order == found.order and loaded.meta == found.meta
    np.testing.assert_array_equal(loaded.candidates, found.candidates)
    np.testing.assert_array_equal(loaded.losses, found.losses)
    assert loaded.first(2) == kit.Sublayers("mlp", found.order)
    kit.Distances(np.zeros((3, 3))).save(tmp_path / "scan.safetensors")
    with pytest.raises(ValueError, match="is not a GreedyRemoval file"):
        GreedyRemoval.load(tmp_path / "scan.safetensors")


def test_refusals():
    model, tokenizer = kit.tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="choose 1 <= steps <= 3 for layers of 4 layers"):
        greedy_removal(model, tokenizer, TEXTS, steps=4)
    with pytest.raises(ValueError, match="unit must be one of layers, attention, mlp"):
        greedy_removal(model, tokenizer, TEXTS, unit="heads", steps=1)
    with pytest.raises(ValueError, match=r"texts \[1\] have fewer than 2 tokens"):
        greedy_removal(model, tokenizer, ["a long enough text", "a"], steps=1)
    assert isinstance(greedy_removal(model, tokenizer, TEXTS, unit="layers", steps=1).first(1), Layers)
