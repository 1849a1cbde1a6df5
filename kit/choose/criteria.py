"""Choosing the block of n consecutive layers to remove: every rule (CRITERIA: the scan's argmin per
metric, the paper's heuristic, the ablation oracle's argmin, by hand), `choose_block`, and the
`Selection` notebook 02 saves. Removing the chosen block is kit.prune's job."""

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..core.artifacts import read_json, write_json
from ..core.block import Block, heuristic_block
from ..scan.similarity import METRICS


@dataclass(frozen=True)
class Criterion:
    """A rule that picks the block of n layers to remove, and the evidence it reads ("needs")."""

    description: str
    needs: str | None  # "distances" (a scan), "oracle" (kit.ablation_losses), "start" or None
    pick: Callable[..., Block]  # (evidence, num_layers, n) -> Block


def _argmin(metric: str | None) -> Callable[..., Block]:
    def pick(distances, num_layers: int, n: int) -> Block:
        scans = distances if isinstance(distances, Mapping) else {distances.meta.get("metric"): distances}
        scan = next(iter(scans.values())) if metric is None and len(scans) == 1 else scans.get(metric)
        if scan is None:
            raise ValueError(f"criterion {metric or 'similarity'!r} needs a scan with metric={metric!r}; given: {sorted(map(str, scans))}")
        return scan.best_block(n)

    return pick


CRITERIA: dict[str, Criterion] = {
    **{
        metric: Criterion(f"argmin over start of the scan's {metric} distance (kit.angular_distances)", "distances", _argmin(metric))
        for metric in METRICS
    },
    "similarity": Criterion("argmin over start of the given scan, whatever its metric", "distances", _argmin(None)),
    "heuristic": Criterion("the paper's heuristic: keep the final layer, drop the n before it", None,
                           lambda _, num_layers, n: heuristic_block(num_layers, n)),
    "loss": Criterion("argmin over start of the oracle's loss on calibration texts (Shortened LLaMA, SLEB)", "oracle",
                      lambda oracle, num_layers, n: oracle.best_block(n)),
    "manual": Criterion("the block starting at a given layer", "start", lambda start, num_layers, n: Block(start, n)),
}  # fmt: skip


def choose_block(criterion: str, num_layers: int, n: int, *, distances=None, oracle=None, start=None) -> Block:
    """The block of n layers that `criterion` (a name in CRITERIA) removes from a model of `num_layers` layers.

    Args:
        distances: a scan (kit.Distances), or {metric: Distances}, for the scan criteria.
        oracle: kit.ablation_losses on calibration texts, for "loss".
        start: the first layer, for "manual".
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    rule = CRITERIA[criterion]
    evidence = {"distances": distances, "oracle": oracle, "start": start}.get(rule.needs)
    if rule.needs and evidence is None:
        hints = {"distances": "a scan (notebook 01_similarity)", "oracle": "kit.ablation_losses on calibration texts",
                 "start": "the block's first layer"}  # fmt: skip
        raise ValueError(f"criterion {criterion!r} needs the {rule.needs}: pass {rule.needs}=, {hints[rule.needs]}")
    tables = distances.values() if isinstance(distances, Mapping) else [distances]
    for name, table in (*(("distances", t) for t in tables), ("oracle", oracle)):
        if table is not None and table.num_layers != num_layers:
            raise ValueError(f"the {name} describe {table.num_layers} layers, the model has {num_layers}")
    return rule.pick(evidence, num_layers, n).check(num_layers)


SELECTION_FILE = "selection.json"  # in the run folder: written by notebook 02, read by notebooks 03 and 04


@dataclass(frozen=True)
class Selection:
    """The block chosen for pruning, from which model and how: what `selection.json` holds.

    source: the name of the criterion that chose it ("similarity": the scan's smallest distance, "heuristic", ...)
    or "manual" (chosen by hand in the block picker); "argmin", kit 0.1's name for "similarity", reads as "similarity"."""

    start: int
    n: int
    distance: float | None
    source: str
    model: str | None

    @property
    def block(self) -> Block:
        return Block(self.start, self.n, self.distance)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "the selection") -> "Selection":
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{origin} is not a block selection: expected the keys {names}, found {keys}. "
                             "Run notebooks/02_select_and_prune.ipynb again to rewrite it.")  # fmt: skip
        return cls(**{**data, "source": {"argmin": "similarity"}.get(data["source"], data["source"])})

    def save(self, path: str | Path) -> Path:
        """Write the selection as JSON to `path` (a run folder's SELECTION_FILE), atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Selection":
        """The selection saved at `path`; a missing file names notebook 02, which writes it."""
        return cls.from_dict(read_json(path, notebook="02_select_and_prune.ipynb"), origin=str(path))
