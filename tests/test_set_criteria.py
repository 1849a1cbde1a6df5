"""The criteria that choose sets of units (kit.choose.criteria: shortgpt, llm_drop_*, greedy_*) against
hand computations on random and real scans, and their refusals."""

import numpy as np
import pytest
import torch

import kit
from kit.choose.criteria import CRITERIA, choose_block, choose_units
from kit.choose.greedy import GreedyRemoval
from kit.choose.regret import compare_sets
from kit.core.block import Block, Layers
from kit.scan.distances import Distances
from kit.testing import random_distances, reference_distances, without_units

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences.", "x = 1 + 2", "a b c d e f g h i j"]


def _sublayer_scan(L: int = 6, seed: int = 1) -> Distances:
    """A random symmetric (2L + 1) x (2L + 1) sublayer scan with a zero diagonal."""
    rng = np.random.default_rng(seed)
    matrix = rng.random((2 * L + 1, 2 * L + 1))
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 0)
    return Distances(torch.tensor(matrix), {"metric": "angular_last", "positions": "sublayers"})


def _k_smallest(scores, n: int) -> tuple[int, ...]:
    return tuple(sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:n]))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_shortgpt_takes_the_layers_with_the_smallest_distance_across_them(n):
    scan = random_distances(7, seed=3)
    m = scan.matrix.numpy()
    expected = _k_smallest([m[i, i + 1] for i in range(7)], n)
    assert choose_units("shortgpt", 7, n, distances=scan) == Layers(expected)
    assert choose_units("shortgpt", 7, n, distances={"angular_last": scan}) == Layers(expected)


@pytest.mark.parametrize("n", [1, 4, 6])
def test_llm_drop_takes_the_sublayers_with_the_smallest_distance_across_them(n):
    scan = _sublayer_scan()
    m = scan.matrix.numpy()
    attention, mlp = [m[2 * i, 2 * i + 1] for i in range(6)], [m[2 * i + 1, 2 * i + 2] for i in range(6)]
    assert choose_units("llm_drop_attention", 6, n, distances=scan) == kit.Sublayers("attention", _k_smallest(attention, n))
    assert choose_units("llm_drop_mlp", 6, n, distances=scan) == kit.Sublayers("mlp", _k_smallest(mlp, n))
    if n < 6:  # a sublayer scan's whole layers: positions 2i
        assert choose_units("shortgpt", 6, n, distances=scan) == Layers(_k_smallest([m[2 * i, 2 * i + 2] for i in range(6)], n))


def test_top_k_on_a_real_sublayer_scan_equal_the_brute_force_reference():
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=6)
    scan = kit.angular_distances(model, tokenizer, TEXTS, max_length=16, batch_size=2, metric="block_influence", sublayers=True)
    m = reference_distances(model, tokenizer, TEXTS, 16, sublayers=True)["block_influence"]
    for n in (1, 2, 5):
        attention = choose_units("llm_drop_attention", 6, n, distances=scan)
        assert attention.kind == "attention" and _among_k_smallest(attention.indices, [m[2 * i, 2 * i + 1] for i in range(6)], n)
        mlp = choose_units("llm_drop_mlp", 6, n, distances=scan)
        assert mlp.kind == "mlp" and _among_k_smallest(mlp.indices, [m[2 * i + 1, 2 * i + 2] for i in range(6)], n)
        layers = choose_units("shortgpt", 6, n, distances=scan)
        assert isinstance(layers, Layers) and _among_k_smallest(layers.indices, [m[2 * i, 2 * i + 2] for i in range(6)], n)


def _among_k_smallest(chosen, reference, n: int, tolerance: float = 4e-5) -> bool:
    """`chosen` is a set of the n smallest `reference` scores, up to ties within `tolerance` (twice the
    scan's agreement with the brute-force reference): where two scores are that close, either may go."""
    inside, outside = [reference[i] for i in chosen], [s for i, s in enumerate(reference) if i not in chosen]
    return len(chosen) == n and (not outside or max(inside) <= min(outside) + tolerance)


def test_greedy_criteria_read_the_first_units_removed():
    greedy = GreedyRemoval([4, 1, 2], np.array([3.0, 3.1, 3.3]), np.full((3, 6), np.nan), {"unit": "mlp"})
    assert choose_units("greedy_mlp", 6, 2, greedy=greedy) == kit.Sublayers("mlp", (1, 4))
    layers = GreedyRemoval([4, 1, 2], np.array([3.0, 3.1, 3.3]), np.full((3, 6), np.nan), {"unit": "layers"})
    assert choose_units("greedy_layers", 6, 3, greedy=layers) == Layers({1, 2, 4})
    with pytest.raises(ValueError, match=r"took 3 steps; n=4 needs greedy_removal\(..., steps=4\)"):
        choose_units("greedy_mlp", 6, 4, greedy=greedy)
    with pytest.raises(ValueError, match=r"removed mlp, the criterion chooses attention: pass kit.choose.greedy.greedy_removal\(..., unit="
                       r"'attention'\)"):
        choose_units("greedy_attention", 6, 2, greedy=greedy)
    with pytest.raises(ValueError, match="the greedy describe 6 layers, the model has 8"):
        choose_units("greedy_mlp", 8, 2, greedy=greedy)


def test_one_registry_block_and_set_criteria():
    scan = random_distances(7)
    assert {rule.unit for rule in CRITERIA.values()} == {"block", "layers", "attention", "mlp"}
    assert choose_units("angular_last", 7, 2, distances=scan) == choose_block("angular_last", 7, 2, distances=scan) == scan.best_block(2)
    assert isinstance(choose_units("heuristic", 7, 2), Block)
    sublayer_scan = _sublayer_scan()  # its whole layers serve the block criteria
    assert choose_block("angular_last", 6, 2, distances=sublayer_scan) == sublayer_scan.layers().best_block(2)


def test_set_criteria_refusals():
    scan = random_distances(6)
    with pytest.raises(ValueError, match=r"layer scan: rescan with sublayers=True \(kit.angular_distances\(..., sublayers=True\)"):
        choose_units("llm_drop_attention", 6, 2, distances=scan)
    with pytest.raises(ValueError, match="'shortgpt' chooses a set of layers, not a block: use kit.choose.criteria.choose_units"):
        choose_block("shortgpt", 6, 2, distances=scan)
    with pytest.raises(ValueError, match="'greedy_layers' needs the greedy: pass greedy=, kit.choose.greedy.greedy_removal"):
        choose_units("greedy_layers", 6, 2)
    with pytest.raises(ValueError, match="Block size n=6 is out of range: choose 1 <= n <= 5"):
        choose_units("shortgpt", 6, 6, distances=scan)
    with pytest.raises(ValueError, match="n=7 mlp sublayers is out of range: choose 1 <= n <= 6"):
        choose_units("llm_drop_mlp", 6, 7, distances=_sublayer_scan())


def test_compare_sets_measures_each_choice_and_its_regret_on_held_out_texts():
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=6)
    calibration = [text[:160] for text in kit.loaders.data.corpus("train")[:4]]
    held_out = [text[:160] for text in kit.loaders.data.corpus("validation")[:4]]
    scan = kit.angular_distances(model, tokenizer, calibration, max_length=24, batch_size=2, sublayers=True)
    greedy = [kit.choose.greedy.greedy_removal(model, tokenizer, calibration, unit=unit, steps=2, max_length=24)
              for unit in ("layers", "mlp")]
    criteria = ["angular_last", "heuristic", "shortgpt", "greedy_layers", "llm_drop_attention", "llm_drop_mlp", "greedy_mlp"]
    before = kit.evaluate.validation_loss(model, tokenizer, held_out, max_length=24).loss
    table = compare_sets(model, tokenizer, held_out, criteria=criteria, ns=[1, 2], distances=scan, greedy=greedy, max_length=24)
    assert kit.evaluate.validation_loss(model, tokenizer, held_out, max_length=24).loss == before  # restored
    assert len(table) == 2 * len(criteria)
    for row in table.itertuples():
        expected = kit.evaluate.validation_loss(without_units(model, row.unit, row.removed), tokenizer, held_out, max_length=24).loss
        assert row.loss == pytest.approx(expected, rel=1e-5), row
    for (n, unit), group in table.groupby(["n", "unit"]):
        assert group["best_loss"].eq(group["loss"].min()).all()
        np.testing.assert_allclose(group["regret"], group["loss"] - group["loss"].min())
        assert group.loc[group["regret"] == 0, "criterion"].iloc[0] == group["best_criterion"].iloc[0]
    assert set(table["unit"]) == {"layers", "attention", "mlp"}
    row = table.set_index(["n", "criterion"]).loc[(2, "greedy_mlp")]
    assert row["removed"] == tuple(sorted(greedy[1].order[:2]))
