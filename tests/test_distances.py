"""The Distances container: indexing by block, the best block, uncertainty (within noise, stability
over resampled texts), the choices table, and its file format."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kit.core.artifacts import MissingArtifactError
from kit.scan.distances import Distances
from kit.testing import random_distances


def test_by_block_indexes_the_matrix_with_nan_where_blocks_do_not_fit():
    distances = random_distances()
    L, matrix, table = distances.num_layers, distances.matrix.numpy(), distances.by_block()
    assert table.shape == (L + 1, L + 1)
    for n in range(L + 1):
        for start in range(L + 1):
            if start + n > L:
                assert np.isnan(table[n, start])
            else:
                assert table[n, start] == matrix[start, start + n]


def test_best_block_is_the_argmin_of_its_row():
    distances = random_distances()
    L, matrix = distances.num_layers, distances.matrix.numpy()
    for n in range(1, L):
        scores = [matrix[start, start + n] for start in range(L - n + 1)]
        best = distances.best_block(n)
        assert (best.start, best.n) == (int(np.argmin(scores)), n)
        assert math.isclose(best.distance, min(scores), rel_tol=1e-6)
    for n in (0, L):
        with pytest.raises(ValueError, match=f"choose 1 <= n <= {L - 1}"):
            distances.best_block(n)


def test_save_load_round_trip(tmp_path):
    distances = random_distances()
    path = distances.save(tmp_path / "distances.safetensors")
    loaded = Distances.load(path)
    assert torch.equal(loaded.matrix, distances.matrix) and loaded.meta == distances.meta
    assert [p.name for p in tmp_path.iterdir()] == ["distances.safetensors"]  # no temporary left behind


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(MissingArtifactError, match="does not exist"):
        Distances.load(tmp_path / "absent.safetensors")
    save_file({"matrix": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a Distances file"):
        Distances.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="square"):
        Distances(torch.zeros(3, 4))


def synthetic_scan(per_text, counts, seed=0):
    """Distances of a scan whose texts had these per-text distance sums, one group per text."""
    matrix = per_text.sum(0) / counts.sum()
    return Distances(torch.tensor(matrix), {"model": "synthetic"}, torch.zeros(matrix.shape), torch.tensor(per_text), torch.tensor(counts))


def test_stability_agrees_with_a_bootstrap_over_texts():
    rng = np.random.default_rng(3)
    L, m, n = 6, 20, 2
    counts = rng.integers(5, 40, m).astype(float)
    per_text = rng.random((m, L + 1, L + 1)) * counts[:, None, None]
    per_text = (per_text + per_text.transpose(0, 2, 1)) / 2
    for start in (1, 2):  # two contenders, equally good in expectation
        per_text[:, start, start + n] = per_text[:, start + n, start] = (0.05 + rng.normal(0, 0.05, m)) * counts
    distances = synthetic_scan(per_text, counts)
    stability = distances.stability(n, resamples=4000, seed=1)
    assert stability.shape == (L + 1 - n,) and stability.sum() == pytest.approx(1)
    wins = np.zeros(L + 1 - n)
    for _ in range(4000):
        pick = rng.integers(m, size=m)
        row = np.diagonal(per_text[pick].sum(0) / counts[pick].sum(), offset=n)
        wins[np.argmin(row)] += 1
    np.testing.assert_allclose(stability, wins / 4000, atol=0.03)
    assert stability[1] > 0.05 and stability[2] > 0.05  # ties in expectation: neither start wins every resample


def test_stability_of_a_clear_winner_is_one():
    counts = np.ones(5)
    per_text = np.full((5, 5, 5), 0.5) + np.random.default_rng(0).normal(0, 0.01, (5, 5, 5))
    per_text[:, 1, 2] = per_text[:, 2, 1] = 0.1
    assert list(synthetic_scan(per_text, counts).stability(1)) == [0, 1, 0, 0]


def test_within_noise_compares_each_start_with_the_best():
    distances = random_distances()
    distances.stderr = torch.full_like(distances.matrix, 0.05)
    L, matrix = distances.num_layers, distances.matrix.numpy()
    for n in range(1, L):
        row, best = np.diagonal(matrix, offset=n), distances.best_block(n)
        expected = row - best.distance <= 1.959964 * np.sqrt(2) * 0.05
        np.testing.assert_array_equal(distances.within_noise(n), expected)
        assert distances.within_noise(n)[best.start]


def test_non_finite_distances_and_files_that_are_not_distances_say_so(tmp_path):
    matrix = torch.rand(5, 5)
    matrix[1, 3] = float("nan")
    distances = Distances(matrix)
    assert distances.best_block(1).start in range(4)  # other sizes are unaffected
    with pytest.raises(ValueError, match=r"blocks of size 2 at starts \[1\] are not finite: rerun the scan"):
        distances.best_block(2)
    (tmp_path / "notes.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError, match="is not a Distances file"):
        Distances.load(tmp_path / "notes.safetensors")


def test_choices_tabulate_the_best_and_the_heuristic_block_with_their_stability():
    rng = np.random.default_rng(5)
    L, m = 6, 12
    counts = rng.integers(5, 40, m).astype(float)
    per_text = rng.random((m, L + 1, L + 1)) * counts[:, None, None]
    per_text = (per_text + per_text.transpose(0, 2, 1)) / 2
    distances = synthetic_scan(per_text, counts)
    distances.stderr = torch.tensor(rng.random((L + 1, L + 1)) / 100)
    table = distances.choices([1, 3], share=0.05, resamples=500, seed=2)
    assert table.index.tolist() == [1, 3]
    for n in (1, 3):
        best, row = distances.best_block(n), table.loc[n]
        assert (row.best_start, row.best_last, row.best_distance, row.best_stderr) == (best.start, best.end - 1, best.distance, best.stderr)
        start = L - 1 - n  # keep the final layer
        assert (row.heuristic_start, row.heuristic_last) == (start, L - 2)
        assert row.heuristic_distance == pytest.approx(float(distances.matrix[start, start + n]))
        assert row.heuristic_stderr == pytest.approx(float(distances.stderr[start, start + n]))
        shares = distances.stability(n, resamples=500, seed=2)
        assert row.stability == {s: round(float(v), 3) for s, v in enumerate(shares) if v >= 0.05}


def test_a_sublayer_scan_gives_its_layers_and_sublayers_and_refuses_blocks(tmp_path):
    rng = np.random.default_rng(7)
    L, m = 4, 5  # positions x_0, m_0, x_1, ..., m_3, x_4
    counts = rng.integers(5, 40, m).astype(float)
    per_text = rng.random((m, 2 * L + 1, 2 * L + 1)) * counts[:, None, None]
    per_text = (per_text + per_text.transpose(0, 2, 1)) / 2
    distances = synthetic_scan(per_text, counts)
    distances.stderr = torch.tensor(rng.random((2 * L + 1, 2 * L + 1)), dtype=torch.float32)
    distances.meta.update(positions="sublayers", middles=["input of post_attention_layernorm"] * L)
    whole = distances.layers()
    layer_scan = synthetic_scan(per_text[:, ::2, ::2], counts)  # what a layer scan of these texts holds
    assert whole.num_layers == distances.num_layers == L and whole.meta == {"model": "synthetic", "positions": "layers"}
    for key in ("matrix", "group_sums", "group_counts"):
        assert torch.equal(getattr(whole, key), getattr(layer_scan, key)), key
    assert torch.equal(whole.stderr, distances.stderr[::2, ::2]) and np.array_equal(whole.stability(2), layer_scan.stability(2))
    assert layer_scan.layers() is layer_scan
    table, matrix, stderr = distances.sublayers(), distances.matrix.numpy(), distances.stderr.numpy()
    assert table.index.name == "layer" and table.index.tolist() == list(range(L))
    for i in range(L):
        assert table.loc[i].tolist() == [matrix[2 * i, 2 * i + 1], stderr[2 * i, 2 * i + 1], matrix[2 * i + 1, 2 * i + 2],
                                         stderr[2 * i + 1, 2 * i + 2]]  # fmt: skip
    for blocks in (lambda d: d.best_block(2), lambda d: d.by_block(), lambda d: d.stability(2), lambda d: d.choices([1])):
        with pytest.raises(ValueError, match="a sublayer scan.*distances.layers\\(\\).best_block\\(n\\).*distances.sublayers\\(\\)"):
            blocks(distances)
    loaded = Distances.load(distances.save(tmp_path / "sublayers.safetensors"))
    assert loaded.meta == distances.meta and loaded.sublayers().equals(table)
    with pytest.raises(ValueError, match="a layer scan, without the layers' middles: rescan with sublayers=True"):
        whole.sublayers()
    assert Distances(torch.zeros(3, 3), {"positions": "sublayers"}).sublayers()["mlp_stderr"].isna().all()  # a bare matrix
    with pytest.raises(ValueError, match="2L \\+ 1 positions, an odd number; the matrix has 4"):
        Distances(torch.zeros(4, 4), {"positions": "sublayers"})
    with pytest.raises(ValueError, match="meta\\['positions'\\] must be 'layers' or 'sublayers', got 'heads'"):
        Distances(torch.zeros(3, 3), {"positions": "heads"})
