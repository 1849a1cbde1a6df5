"""The kit's own sums: under KIT_ODD_CHUNKS its chunk sizes are odd and shaped by the work, the defaults
otherwise, and what that is for (two differently shaped computations compared bit for bit fail); sums by
group as a one-hot product."""

import pytest
import torch

from kit.core.sums import ODD_CHUNKS, chunk_size


def test_defaults_without_the_setting(monkeypatch):
    monkeypatch.delenv(ODD_CHUNKS, raising=False)
    assert chunk_size(512, 32, 7) == 512 and chunk_size(1024, 3, 13, 32) == 1024


def test_odd_sizes_that_split_the_work_and_repeat_for_the_same_shape(monkeypatch):
    monkeypatch.setenv(ODD_CHUNKS, "1")
    sizes = {}
    for default in (256, 512, 1024):
        for extent in (1, 2, 3, 8, 32, 576, 5000):
            for shape in ((7,), (13,), (49152,)):
                size = chunk_size(default, extent, *shape)
                assert size % 2 == 1 and 1 <= size <= default, (default, extent, shape, size)
                assert extent < 3 or size < extent  # the work is split wherever it can be
                assert chunk_size(default, extent, *shape) == size  # a repeat is chunked the same way
                sizes[default, extent, shape] = size
    assert len({sizes[512, 32, shape] for shape in ((7,), (13,), (49152,))}) > 1  # other shapes, other chunks


@pytest.mark.parametrize("value", ["0", "", "yes"])
def test_only_1_turns_it_on(monkeypatch, value):
    monkeypatch.setenv(ODD_CHUNKS, value)
    assert chunk_size(512, 32, 7) == 512


def test_the_setting_splits_the_scans_gram_sums_by_the_number_of_positions(monkeypatch):
    """The reason for the setting: a layer scan (7 positions) and a sublayer scan (13) slice the hidden
    features differently under it, as two BLAS calls of other shapes may on another CPU."""
    from kit.scan import similarity

    monkeypatch.setenv(ODD_CHUNKS, "1")
    slices = {positions: chunk_size(similarity._HIDDEN_SLICE, 32, positions) for positions in (7, 13)}
    assert slices[7] != slices[13] and all(size < 32 for size in slices.values())
    torch.manual_seed(0)
    stack = torch.randn(4, 13, 32)
    layer_positions = similarity._cosines(stack[:, ::2])
    torch.testing.assert_close(similarity._cosines(stack)[:, ::2, ::2], layer_positions, rtol=1e-13, atol=1e-15)
