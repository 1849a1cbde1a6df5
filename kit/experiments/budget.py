"""One budget, every granularity: for each way of choosing what to remove (the paper's block of whole
layers, any set of whole layers, attention sublayers, MLP sublayers; each by its own criterion), the
most units whose parameters fit each budget, evaluated on the same texts and questions. Which choice
wins at each budget is kit.experiments.curves.best_by_budget's reading of the table returned here.

    choices = [Choice("block", "similarity", lambda n: scan.best_block(n)), Choice("attention", "greedy", ...)]
    table = budget_sweep(model, tokenizer, choices=choices, budgets=[0.05, 0.1], evals=[ValidationLoss(texts)])
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from ..choose.criteria import UNITS
from ..core import distributed
from ..core.progress import progress
from ..evaluate.inference_cost import parameters
from ..evaluate.metrics import Evaluation, evaluate_all
from ..prune import dropped
from . import results

POINT = ("budget", "unit", "criterion", "n", "removed", "fraction")  # where a budget sweep evaluated


@dataclass(frozen=True)
class Choice:
    """A way to choose what to remove: `pick(n)` gives the n units it removes (a kit.Block, kit.Layers or
    kit.Sublayers) and raises ValueError where it has no n units to give.

    Args:
        unit: what it removes, one of kit.choose.criteria.UNITS.
        criterion: the name of the rule choosing them (a name in kit.choose.criteria.CRITERIA).
        pick: n -> the removal.
    """

    unit: str
    criterion: str
    pick: Callable[[int], object]

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r} is not one of {UNITS}")


def removed_parameters(model, removal) -> int:
    """How many of `model`'s parameters `removal` takes away (counted on the model without it, kit.prune.dropped)."""
    total = parameters(model)
    with dropped(model, removal):
        return total - parameters(model)


def fit(model, choice: Choice, budget: float) -> tuple[int, object, float] | None:
    """(n, removal, fraction): the most units of `choice` whose parameters are at most `budget` (a fraction)
    of `model`'s, with the fraction they are; None when even one unit is over budget."""
    total, fitted = parameters(model), None
    for n in itertools.count(1):
        try:
            removal = choice.pick(n)
        except ValueError:
            break  # no n-th unit: a block as large as the model, a greedy order that stops
        fraction = removed_parameters(model, removal) / total
        if fraction > budget:
            break
        fitted = (n, removal, fraction)
    return fitted


def most_units(model, singles: Sequence, budget: float) -> int:
    """How many of the units `singles` (each a removal of one unit, e.g. kit.Layers([i]) for every layer i) at
    most fit `budget` (a fraction of `model`'s parameters): the number of the smallest ones that do. What a
    greedy criterion must order to serve every budget up to this one."""
    total, sizes = parameters(model), sorted(removed_parameters(model, single) for single in singles)
    return sum(1 for cumulative in itertools.accumulate(sizes) if cumulative <= budget * total)


def budget_sweep(model, tokenizer, *, choices: Sequence[Choice], budgets: Sequence[float], evals: Sequence[Evaluation]) -> pd.DataFrame:
    """Evaluate `model` unpruned and, for every budget and choice, without the most units that fit (fit).

    Each pruned model is a view of the loaded one (kit.prune.dropped), restored afterwards; a removal that two
    budgets share is evaluated once.
    Args:
        choices: the ways of choosing (Choice), e.g. one per unit and criterion.
        budgets: fractions of the model's parameters, each in (0, 1).
        evals: the evaluations (kit.evaluate.metrics), e.g. ValidationLoss, RecallAccuracy, InferenceCost.
    Returns one row per (point, metric): budget (0 for the unpruned model, whose unit and criterion are
    "none"), unit, criterion, n (units removed), removed (the units in words), fraction (of the parameters
    removed), then the columns of kit.experiments.results.rows: metric, value, ci_low, ci_high, chance,
    outcomes, per_text.
    """
    if bad := [b for b in budgets if not 0 < b < 1]:
        raise ValueError(f"budgets {bad} are not fractions of the parameters in (0, 1), e.g. [0.05, 0.1, 0.2]")
    if not choices:
        raise ValueError("no choices: pass at least one kit.experiments.budget.Choice")
    rows = results.rows(evaluate_all(model, tokenizer, evals), budget=0.0, unit="none", criterion="none", n=0, removed="",
                        fraction=0.0)  # fmt: skip
    measured: dict[tuple[str, str], dict] = {}
    points = list(itertools.product(sorted(budgets), choices))
    for budget, choice in progress(points, desc="budget sweep", unit="point", show=distributed.is_main()):
        fitted = fit(model, choice, budget)
        if fitted is None:
            continue
        n, removal, fraction = fitted
        key = (choice.unit, removal.label)
        if key not in measured:
            with dropped(model, removal):
                measured[key] = evaluate_all(model, tokenizer, evals)
        rows += results.rows(measured[key], budget=budget, unit=choice.unit, criterion=choice.criterion, n=n,
                             removed=removal.label, fraction=fraction)  # fmt: skip
    return pd.DataFrame(rows)
