"""Judging the criteria that choose sets of units (and blocks beside them) on held-out texts, as
kit.choose.oracle.compare_criteria judges block criteria: each chosen set's held-out loss, measured with
the set removed in memory, and its regret against the best of the compared choices."""

import pandas as pd

from ..core import layers
from ..evaluate.loss import validation_loss
from ..prune import dropped
from .criteria import CRITERIA, choose_units


def _kind(unit: str) -> str:
    """What a criterion's choices are compared with: a block is a set of layers."""
    return "layers" if unit == "block" else unit


def _held_out_loss(model, tokenizer, texts, chosen, max_length: int, batch_size: int) -> float:
    """Validation loss of `model` without `chosen` (a Block, Layers or Sublayers), removed for a moment by kit.prune.dropped."""
    with dropped(model, chosen):
        return validation_loss(model, tokenizer, texts, max_length=max_length, batch_size=batch_size).loss


def compare_sets(
    model, tokenizer, texts: list[str], *, criteria, ns, distances=None, oracle=None, greedy=(), max_length: int = 512,
    batch_size: int = 8,
) -> pd.DataFrame:  # fmt: skip
    """How well each criterion's chosen set of n units does on held-out texts it did not choose on.

    For sets there is no exhaustive oracle (a model of L layers has C(L, n) sets of n layers): the regret
    of a choice is its held-out loss minus the best held-out loss among the compared choices of the same
    kind at that n (whole layers, a block counting as a set of layers; attention; MLP), so it is 0 for the
    best of them and says nothing of the sets no criterion chose.

    Args:
        texts: the held-out texts, each with at least two tokens.
        criteria: names in kit.choose.criteria.CRITERIA, block and set criteria alike.
        ns: the numbers of units removed.
        distances, oracle: the evidence, as for kit.choose.criteria.choose_units.
        greedy: kit.choose.greedy.greedy_removal results on calibration texts, one per unit, for the greedy_* criteria.
    Returns one row per (n, criterion): unit, removed (the layer indices), loss, best_criterion, best_loss, regret.
    """
    unknown = [name for name in criteria if name not in CRITERIA]
    if unknown:
        raise ValueError(f"Unknown criteria {unknown}; choose from: {', '.join(CRITERIA)}")
    greedy_by_unit = {result.unit: result for result in greedy}
    L, measured, rows = layers.num_layers(model), {}, []
    for n in ns:
        for name in criteria:
            unit = CRITERIA[name].unit
            chosen = choose_units(name, L, n, distances=distances, oracle=oracle, greedy=greedy_by_unit.get(unit))
            indices = tuple(chosen.layers)
            key = (_kind(unit), indices)
            if key not in measured:
                measured[key] = _held_out_loss(model, tokenizer, texts, chosen, max_length, batch_size)
            rows.append(dict(n=n, criterion=name, unit=_kind(unit), removed=indices, loss=measured[key]))
    table = pd.DataFrame(rows, columns=["n", "criterion", "unit", "removed", "loss"])
    best = table.loc[table.groupby(["n", "unit"], sort=False)["loss"].idxmin(), ["n", "unit", "criterion", "loss"]]
    table = table.merge(best.rename(columns={"criterion": "best_criterion", "loss": "best_loss"}), on=["n", "unit"])
    return table.assign(regret=table["loss"] - table["best_loss"])
