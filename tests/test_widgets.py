"""The block picker, driven in-process by setting its widgets' values, and the selection it saves."""

import json

import pytest
import torch

from kit.choose.criteria import Selection
from kit.core.block import Block
from kit.experiments.widgets import BlockPicker
from kit.scan.distances import Distances

L = 6


@pytest.fixture
def distances():
    """A hand-made symmetric 7 x 7 matrix whose best start differs per n and from the heuristic."""
    matrix = torch.full((L + 1, L + 1), 0.9)
    matrix.fill_diagonal_(0.0)
    for (i, j), value in {(1, 2): 0.1, (2, 4): 0.2, (0, 3): 0.3, (3, 5): 0.5, (4, 6): 0.6}.items():
        matrix[i, j] = matrix[j, i] = value
    return Distances(matrix, {"model": "synthetic", "metric": "angular_last"})


def test_default_is_the_similarity_block(distances):
    picker = BlockPicker(distances, n=2)
    assert picker.block == Block(2, 2, pytest.approx(0.2)) == distances.best_block(2)
    assert picker.source == "similarity"
    assert picker.selection() == Selection(2, 2, pytest.approx(0.2), "similarity", "synthetic")
    assert "layers 2&ndash;3" in picker._info.value and bytes(picker._image.value).startswith(b"\x89PNG")


def test_changing_n_moves_start_to_the_new_best_block(distances):
    picker = BlockPicker(distances, n=2)
    picker._n.value = 3
    assert picker.block == Block(0, 3, pytest.approx(0.3)) and picker.source == "similarity"
    assert picker._start.max == L - 3
    picker._n.value = 1
    assert picker.block == Block(1, 1, pytest.approx(0.1))


def test_block_follows_a_manual_change(distances):
    picker = BlockPicker(distances, n=2)
    picker._start.value = 4
    assert picker.block == Block(4, 2, pytest.approx(0.6)) and picker.source == "manual"
    assert picker.selection().source == "manual"
    picker._start.value = 2
    assert picker.source == "similarity"


def test_heuristic_criterion_keeps_the_final_layer(distances):
    picker = BlockPicker(distances, n=2, criterion="heuristic")
    assert picker.block == Block(3, 2, pytest.approx(0.5)) and picker.source == "heuristic"
    picker._n.value = 3
    assert picker.block == Block(2, 3, pytest.approx(0.9)) and picker.source == "heuristic"


def test_explicit_start_and_bad_input(distances):
    assert BlockPicker(distances, n=2, start=3).source == "manual"
    with pytest.raises(ValueError, match="choose 0 <= start <= 4"):
        BlockPicker(distances, n=2, start=5)
    with pytest.raises(ValueError, match="choose 1 <= n <= 5"):
        BlockPicker(distances, n=6)
    with pytest.raises(ValueError, match="similarity, heuristic"):
        BlockPicker(distances, n=2, criterion="random")


def test_static_figure_boxes_the_chosen_block(distances):
    picker = BlockPicker(distances, n=2)
    picker._start.value = 0
    ax = picker.plot()
    (box,) = ax.patches
    assert (box.get_x(), box.get_y()) == (-0.5, 1.5)
    bundle = picker._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == "BlockPicker: layers 0-1 (n=2, start=0, manual), distance 0.9000"


def test_any_criterion_of_the_registry(distances):
    import numpy as np

    from kit.choose.oracle import Ablation

    loss = np.full((L + 1, L + 1), np.nan)
    loss[2, : L - 1] = [3.0, 2.5, 2.9, 2.0, 4.0]
    picker = BlockPicker(distances, n=2, criterion="loss", oracle=Ablation(loss, loss))
    assert picker.block == Block(3, 2, pytest.approx(0.5)) and picker.source == "loss"
    with pytest.raises(ValueError, match="'loss' needs the oracle"):
        BlockPicker(distances, n=2, criterion="loss")


def test_selection_round_trips_through_its_file(distances, tmp_path):
    picker = BlockPicker(distances, n=2)
    picker._start.value = 4
    path = picker.selection().save(tmp_path / "selection.json")
    assert json.loads(path.read_text()) == {"start": 4, "n": 2, "distance": pytest.approx(0.6), "source": "manual", "model": "synthetic"}
    loaded = Selection.load(path)
    assert loaded == picker.selection() and loaded.block == Block(4, 2, pytest.approx(0.6))
