"""The greedy removal (kit.choose.greedy) against the brute-force greedy loop that rebuilds every candidate
model and scores it (kit.testing.reference_greedy), its artifact, and its refusals."""

import numpy as np
import pytest
import torch

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
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=6)
    found = _assert_equals_brute_force(model, tokenizer, unit, 4, batch_size)
    assert found.unit == unit and found.first(2) == kit.choose.branches.unit_set(unit, found.order[:2])


@pytest.mark.parametrize("arch", kit.testing.TINY_ARCHITECTURES)  # MoE, MLA, hybrid Mamba, linear attention, multimodal too
def test_every_tiny_architecture_equals_the_brute_force_greedy(arch):
    model, tokenizer = kit.testing.tiny_model(arch, num_layers=4)
    for unit in ("layers", "attention", "mlp"):  # OPT's MLP: its fc1 and fc2 on the layer itself (Middle.mlp)
        _assert_equals_brute_force(model, tokenizer, unit, 2, 2)


def test_save_and_load(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
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
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="choose 1 <= steps <= 3 for layers of 4 layers"):
        greedy_removal(model, tokenizer, TEXTS, steps=4)
    with pytest.raises(ValueError, match="unit must be one of layers, attention, mlp"):
        greedy_removal(model, tokenizer, TEXTS, unit="heads", steps=1)
    with pytest.raises(ValueError, match=r"texts \[1\] have fewer than 2 tokens"):
        greedy_removal(model, tokenizer, ["a long enough text", "a"], steps=1)
    assert isinstance(greedy_removal(model, tokenizer, TEXTS, unit="layers", steps=1).first(1), Layers)


@pytest.mark.parametrize("batch_size", [5, 2])
def test_a_candidate_that_overflows_never_wins(monkeypatch, batch_size):
    """A candidate whose loss comes out NaN (an fp16 overflow) is passed over; every candidate NaN stops with advice."""
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    clean = greedy_removal(model, tokenizer, TEXTS, steps=1, max_length=24, batch_size=batch_size)
    overflowing, real = {clean.order[0]}, kit.choose.greedy._candidate

    def candidate(model, batch, unit, j, *args, **kwargs):
        final = real(model, batch, unit, j, *args, **kwargs)
        return torch.full_like(final, float("nan")) if j in overflowing else final

    monkeypatch.setattr(kit.choose.greedy, "_candidate", candidate)
    found = greedy_removal(model, tokenizer, TEXTS, steps=1, max_length=24, batch_size=batch_size)
    runner_up = int(np.nanargmin(np.where(np.arange(4) == clean.order[0], np.nan, clean.candidates[0])))
    assert found.order == [runner_up] and np.isnan(found.candidates[0, clean.order[0]])
    overflowing.update(range(4))
    with pytest.raises(FloatingPointError, match="every greedy candidate came out inf or NaN.*float32 or bfloat16"):
        greedy_removal(model, tokenizer, TEXTS, steps=1, max_length=24, batch_size=batch_size)


def test_memory_holds_one_residual_stream_not_a_candidates_states():
    """One batch of 8 texts x 64 tokens on 12 layers: the stored stream at 13 positions, the state a candidate
    run is at, and the work of one chunk of logits. Measured: 30.8 streams (48.8 when each candidate's and the
    best candidate's states were kept, up to 12 positions each)."""
    from kit.core.memory import measure

    model, tokenizer = kit.testing.tiny_model("llama", num_layers=12)
    texts = [text[:400] for text in corpus("validation")[:8]]
    with measure() as memory:
        greedy_removal(model, tokenizer, texts, steps=2, max_length=64, batch_size=8)
    stream = 8 * 64 * model.config.hidden_size * 4  # one position's states, fp32
    logits = 256 * model.config.vocab_size * 4  # one chunk of logits (kit.choose.replay.TOKEN_CHUNK tokens)
    assert memory.peak < (13 + 2) * stream + 5 * logits, f"{memory.peak / stream:.1f} streams"
