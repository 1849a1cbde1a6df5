"""Choosing what to remove: every rule (CRITERIA), one registry for the block of n consecutive layers (the
scan's argmin per metric, the paper's heuristic, the ablation oracle's argmin, by hand) and for sets of
n units (whole layers, attention or MLP sublayers: the n smallest single-unit distances, the first n of a
greedy removal); `choose_block` and `choose_units`, and the `Selection` notebook 02 saves. Removing the
chosen block is kit.prune's job."""

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..core.artifacts import read_json, write_json
from ..core.block import Block, heuristic_block
from ..scan.similarity import METRICS
from .branches import SUBLAYERS, unit_set
from .branches import UNITS as SET_UNITS

UNITS = ("block", *SET_UNITS)  # what a criterion removes: a block, any layers, attention or MLP sublayers


@dataclass(frozen=True)
class Criterion:
    """A rule that picks what to remove, the evidence it reads ("needs") and what it removes ("unit")."""

    description: str
    needs: str | None  # "distances" (a scan), "oracle" (kit.choose.oracle.ablation_losses), "greedy"
    #                    (kit.choose.greedy.greedy_removal), "start" or None
    pick: Callable  # (evidence, num_layers, n) -> Block, Layers or Sublayers
    unit: str = "block"  # one of UNITS: "block" (n consecutive layers), "layers" (any n layers), "attention" or "mlp" (n sublayers)


def _one_scan(distances, metric: str | None, name: str):
    """The scan with `metric` among `distances` (a scan or {metric: scan}); with metric None, the only one."""
    scans = distances if isinstance(distances, Mapping) else {distances.meta.get("metric"): distances}
    scan = next(iter(scans.values())) if metric is None and len(scans) == 1 else scans.get(metric)
    if scan is None:
        raise ValueError(f"criterion {name!r} needs a scan with metric={metric!r}; given: {sorted(map(str, scans))}")
    return scan


def _argmin(metric: str | None) -> Callable[..., Block]:
    def pick(distances, num_layers: int, n: int) -> Block:
        return _one_scan(distances, metric, metric or "similarity").layers().best_block(n)  # a sublayer scan's layers too

    return pick


def _smallest(unit: str, name: str) -> Callable:
    """The n units with the smallest single-unit distance of the given scan (lower layer first on ties)."""

    def pick(distances, num_layers: int, n: int):
        scan = _one_scan(distances, None, name)
        if unit == "layers":
            scores = np.diagonal(scan.layers().matrix.numpy(), offset=1)  # D[i, i + 1]
        elif scan.positions != "sublayers":
            raise ValueError(f"criterion {name!r} reads the {unit} sublayers' distances, and the scan given is a layer scan: "
                             "rescan with sublayers=True (kit.angular_distances(..., sublayers=True), python -m kit scan --sublayers)")  # fmt: skip
        else:
            scores = scan.sublayers()[unit].to_numpy()
        if not np.isfinite(scores).all():
            raise ValueError(f"the scan's {unit} distances at layers {np.flatnonzero(~np.isfinite(scores)).tolist()} are not "
                             "finite: rerun the scan (notebook 01) in float32 or bfloat16")  # fmt: skip
        return unit_set(unit, np.argsort(scores, kind="stable")[:n].tolist())

    return pick


def _greedy(unit: str) -> Callable:
    def pick(greedy, num_layers: int, n: int):
        if greedy.unit != unit:
            raise ValueError(f"this greedy removal removed {greedy.unit}, the criterion chooses {unit}: "
                             f"pass kit.choose.greedy.greedy_removal(..., unit={unit!r})")  # fmt: skip
        return greedy.first(n)

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
    "shortgpt": Criterion("the n layers with the smallest distance D[i, i+1] of the given scan (ShortGPT with "
                          "metric='block_influence')", "distances", _smallest("layers", "shortgpt"), "layers"),
    **{
        f"llm_drop_{kind}": Criterion(f"the n {kind} sublayers with the smallest distance across them in a sublayer "
                                      "scan (LLM-Drop)", "distances", _smallest(kind, f"llm_drop_{kind}"), kind)
        for kind in SUBLAYERS
    },
    **{
        f"greedy_{unit}": Criterion(f"the first n {unit} of a greedy removal on calibration texts (SLEB; "
                                    "kit.choose.greedy.greedy_removal)", "greedy", _greedy(unit), unit)
        for unit in SET_UNITS
    },
}  # fmt: skip

_HINTS = {"distances": "a scan (notebook 01_similarity)", "oracle": "kit.choose.oracle.ablation_losses on calibration texts",
          "greedy": "kit.choose.greedy.greedy_removal on calibration texts", "start": "the block's first layer"}  # fmt: skip


def _check_n(unit: str, num_layers: int, n: int) -> None:
    if unit in ("block", "layers"):
        Block(0, n).check(num_layers)
    elif not 1 <= n <= num_layers:
        raise ValueError(f"n={n} {unit} sublayers is out of range: choose 1 <= n <= {num_layers} for {num_layers} layers.")


def choose_units(criterion: str, num_layers: int, n: int, *, distances=None, oracle=None, greedy=None, start=None):
    """What `criterion` (a name in CRITERIA) removes from a model of `num_layers` layers: n units.

    Args:
        distances: a scan (kit.Distances), or {metric: Distances}, for the scan criteria; a sublayer scan
            (sublayers=True) for llm_drop_attention and llm_drop_mlp, whose whole layers serve the others.
        oracle: kit.choose.oracle.ablation_losses on calibration texts, for "loss".
        greedy: kit.choose.greedy.greedy_removal on calibration texts, for greedy_layers / greedy_attention / greedy_mlp.
        start: the first layer, for "manual".
    Returns a Block (CRITERIA[criterion].unit "block"), Layers ("layers"), or Sublayers ("attention", "mlp").
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    rule = CRITERIA[criterion]
    evidence = {"distances": distances, "oracle": oracle, "greedy": greedy, "start": start}.get(rule.needs)
    if rule.needs and evidence is None:
        raise ValueError(f"criterion {criterion!r} needs the {rule.needs}: pass {rule.needs}=, {_HINTS[rule.needs]}")
    tables = distances.values() if isinstance(distances, Mapping) else [distances]
    for name, table in (*(("distances", t) for t in tables), ("oracle", oracle), ("greedy", greedy)):
        if table is not None and table.num_layers != num_layers:
            raise ValueError(f"the {name} describe {table.num_layers} layers, the model has {num_layers}")
    _check_n(rule.unit, num_layers, n)
    return rule.pick(evidence, num_layers, n).check(num_layers)


def choose_block(criterion: str, num_layers: int, n: int, *, distances=None, oracle=None, start=None) -> Block:
    """The block of n layers that `criterion` (a name in CRITERIA whose unit is "block") removes from a
    model of `num_layers` layers.

    Args:
        distances: a scan (kit.Distances), or {metric: Distances}, for the scan criteria.
        oracle: kit.choose.oracle.ablation_losses on calibration texts, for "loss".
        start: the first layer, for "manual".
    """
    if criterion in CRITERIA and (unit := CRITERIA[criterion].unit) != "block":
        raise ValueError(f"criterion {criterion!r} chooses a set of {unit}, not a block: use kit.choose.criteria.choose_units")
    return choose_units(criterion, num_layers, n, distances=distances, oracle=oracle, start=start)


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
