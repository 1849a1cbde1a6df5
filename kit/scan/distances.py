"""The result of a layer-similarity scan: the distance between every pair of residual-stream
positions 0..L, with its uncertainty, and the blocks it scores (`matrix[start, start + n]`); of a
sublayer scan, between its 2L + 1 positions (each layer's input, middle, then the last output),
which also score each attention and MLP sublayer."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import artifacts
from ..core.block import Block, heuristic_block
from ..core.stats import Z95

_FORMAT = "kit.scan.distances/1"


@dataclass
class Distances:
    """Mean distance between residual-stream positions: `matrix[i, j]`, i, j in 0..L; of a sublayer
    scan (meta["positions"] == "sublayers"), i, j in 0..2L: position 2i is layer i's input, 2i + 1
    its middle (after its attention branch, before its MLP branch). The blocks (`best_block`,
    `by_block`, `stability`, ...) are a layer scan's: `layers()` gives them from a sublayer scan.

    stderr: standard error of each entry over the calibration texts (None for a bare matrix).
    group_sums, group_counts: the distance sums [K, P, P] of the P positions and token counts [K] of
    K groups of texts, which `stability` resamples. meta records how it was measured: model, n_texts,
    tokens, max_length, metric, groups, positions ("layers", or "sublayers" with the layers' `middles`),
    versions."""

    matrix: torch.Tensor
    meta: dict = field(default_factory=dict)
    stderr: torch.Tensor | None = None
    group_sums: torch.Tensor | None = None
    group_counts: torch.Tensor | None = None

    def __post_init__(self):
        self.matrix = torch.as_tensor(self.matrix, dtype=torch.float32).cpu()
        if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1] or self.matrix.shape[0] < 2:
            raise ValueError(f"Distances needs a square (L+1) x (L+1) matrix with L >= 1, got shape {tuple(self.matrix.shape)}")
        if self.positions not in ("layers", "sublayers"):
            raise ValueError(f"meta['positions'] must be 'layers' or 'sublayers', got {self.positions!r}")
        if self.positions == "sublayers" and self.matrix.shape[0] % 2 == 0:
            raise ValueError(f"a sublayer scan has 2L + 1 positions, an odd number; the matrix has {self.matrix.shape[0]}")
        if self.stderr is not None:
            self.stderr = torch.as_tensor(self.stderr, dtype=torch.float32).cpu()
            if self.stderr.shape != self.matrix.shape:
                raise ValueError(f"stderr has shape {tuple(self.stderr.shape)}, the matrix {tuple(self.matrix.shape)}")
        if (self.group_sums is None) != (self.group_counts is None):
            raise ValueError("group_sums and group_counts go together: pass both or neither")
        if self.group_sums is not None:
            self.group_sums = torch.as_tensor(self.group_sums, dtype=torch.float64).cpu()
            self.group_counts = torch.as_tensor(self.group_counts, dtype=torch.float64).cpu()
            if self.group_sums.shape != (len(self.group_counts), *self.matrix.shape):
                raise ValueError(f"group_sums must have shape (K, L+1, L+1) with K = len(group_counts), got {tuple(self.group_sums.shape)}")

    @property
    def positions(self) -> str:
        """What the matrix's positions are: "layers" (0..L) or "sublayers" (2L + 1, with the middles)."""
        return self.meta.get("positions", "layers")

    @property
    def num_layers(self) -> int:
        return (self.matrix.shape[0] - 1) // (2 if self.positions == "sublayers" else 1)

    def layers(self) -> "Distances":
        """The whole-layer positions 0..L alone, with their standard errors and group sums: of a sublayer
        scan, what a layer scan of the same texts measures; a layer scan itself."""
        if self.positions == "layers":
            return self
        every = lambda x: None if x is None else x[..., ::2, ::2]  # noqa: E731
        meta = {key: value for key, value in self.meta.items() if key != "middles"} | {"positions": "layers"}
        return Distances(every(self.matrix), meta, every(self.stderr), every(self.group_sums), self.group_counts)

    def sublayers(self):
        """One row per layer (a pandas DataFrame indexed by layer): the distance across its attention (or
        mixer) sublayer, from its input to its middle, and across its MLP sublayer, from its middle to its
        output, each with its standard error (NaN without one)."""
        import pandas as pd

        if self.positions != "sublayers":
            raise ValueError("these Distances are a layer scan, without the layers' middles: rescan with sublayers=True "
                             "(kit.angular_distances(..., sublayers=True))")  # fmt: skip
        stderr = torch.full_like(self.matrix, float("nan")) if self.stderr is None else self.stderr
        i = torch.arange(self.num_layers)
        columns = {"attention": (2 * i, 2 * i + 1), "mlp": (2 * i + 1, 2 * i + 2)}
        table = {}
        for name, (a, b) in columns.items():
            table[name], table[f"{name}_stderr"] = self.matrix[a, b].numpy(), stderr[a, b].numpy()
        return pd.DataFrame(table, index=pd.Index(i.numpy(), name="layer"))

    def by_block(self) -> np.ndarray:
        """table[n, start] = distance of block (start, n) = matrix[start, start + n].

        Shape (L+1, L+1), indexed directly by n and start: NaN where start + n > L; row 0 is 0."""
        return _by_block(self._blocks().matrix.numpy())

    def stderr_by_block(self) -> np.ndarray:
        """Like by_block, for the standard errors."""
        return _by_block(self._blocks()._uncertain("stderr").numpy())

    def best_block(self, n: int) -> Block:
        """The block of n layers whose input and output are closest (first one on ties), with its
        distance's standard error when the scan measured it."""
        Block(0, n).check(self._blocks().num_layers)
        row = np.diagonal(self.matrix.numpy(), offset=n)
        if not np.isfinite(row).all():
            bad = np.flatnonzero(~np.isfinite(row)).tolist()
            raise ValueError(f"the distances of blocks of size {n} at starts {bad} are not finite: rerun the scan "
                             "(notebook 01) in float32 or bfloat16, or check the model's weights")  # fmt: skip
        start = int(np.argmin(row))
        stderr = None if self.stderr is None else float(self.stderr[start, start + n])
        return Block(start, n, float(row[start]), stderr)

    def within_noise(self, n: int, z: float = Z95) -> np.ndarray:
        """For each start (length L + 1 - n): is block (start, n) within noise of the best block of
        size n, i.e. is its distance above the best by less than z standard errors of the difference
        (taken as independent)? The best block itself is always True."""
        best = self.best_block(n)
        se = np.diagonal(self._uncertain("stderr").numpy(), offset=n)
        row = np.diagonal(self.matrix.numpy(), offset=n)
        return row - best.distance <= z * np.sqrt(se**2 + best.stderr**2)

    def stability(self, n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
        """For each start (length L + 1 - n, summing to 1): the share of bootstrap resamples of the
        scan's groups of texts in which block (start, n) is the best block of size n."""
        Block(0, n).check(self._blocks().num_layers)
        sums, counts = self._uncertain("group_sums"), self.group_counts
        if len(counts) < 2:
            raise ValueError("stability needs at least 2 groups of texts: rescan with at least 2 texts and groups >= 2")
        sums, counts = sums.numpy(), counts.numpy()
        rows = np.diagonal(sums, offset=n, axis1=1, axis2=2) + np.diagonal(sums, offset=-n, axis1=1, axis2=2)  # [K, starts]
        weights = np.random.default_rng(seed).multinomial(len(counts), np.full(len(counts), 1 / len(counts)), resamples)
        means = (weights @ rows) / (2 * (weights @ counts))[:, None]  # [resamples, starts]
        return np.bincount(means.argmin(axis=1), minlength=rows.shape[1]) / resamples

    def choices(self, ns, *, share: float = 0.05, resamples: int = 1000, seed: int = 0):
        """For each block size n in `ns`, one row (a pandas DataFrame): the best block's first and
        last layer, distance and standard error; the same for the paper's heuristic block (keep the
        final layer); and `stability`: every start chosen as best in at least `share` of the
        bootstrap resamples (Distances.stability), as {start: share}."""
        import pandas as pd

        table, errors = self.by_block(), self.stderr_by_block()
        rows = []
        for n in ns:
            best, simple = self.best_block(n), heuristic_block(self.num_layers, n)
            shares = self.stability(n, resamples=resamples, seed=seed)
            rows.append({
                "n": n, "best_start": best.start, "best_last": best.end - 1, "best_distance": best.distance,
                "best_stderr": best.stderr, "heuristic_start": simple.start, "heuristic_last": simple.end - 1,
                "heuristic_distance": float(table[n, simple.start]), "heuristic_stderr": float(errors[n, simple.start]),
                "stability": {int(start): round(float(s), 3) for start, s in enumerate(shares) if s >= share},
            })  # fmt: skip
        return pd.DataFrame(rows).set_index("n")

    def _blocks(self) -> "Distances":
        """Self, whose positions score blocks of whole layers; a sublayer scan is refused."""
        if self.positions == "sublayers":
            raise ValueError("these Distances are a sublayer scan (2L + 1 positions): take its blocks of whole layers "
                             "from distances.layers() (e.g. distances.layers().best_block(n)), its sublayers from "
                             "distances.sublayers()")  # fmt: skip
        return self

    def _uncertain(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"these Distances carry no {name}: they were saved by an older kit or built from a bare matrix; "
                "rerun the scan (kit.angular_distances, notebook 01_similarity)"
            )
        return value

    def save(self, path: str | Path) -> Path:
        """One safetensors file; `meta` goes into its header as JSON. Written atomically."""
        tensors = {"matrix": self.matrix, "stderr": self.stderr, "group_sums": self.group_sums, "group_counts": self.group_counts}
        return artifacts.save_tensors(path, {k: v for k, v in tensors.items() if v is not None}, format=_FORMAT, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "Distances":
        """Read a file of `save`; files from before the scan measured uncertainty load without it."""
        not_it = f"{path} is not a Distances file (saved by Distances.save / notebook 01_similarity)"
        tensors, meta = artifacts.load_tensors(path, format=_FORMAT, not_it=not_it)
        return cls(meta=meta, **tensors)


def _by_block(matrix: np.ndarray) -> np.ndarray:
    size = matrix.shape[0]
    table = np.full((size, size), np.nan, dtype=np.float32)
    for n in range(size):
        table[n, : size - n] = np.diagonal(matrix, offset=n)
    return table
