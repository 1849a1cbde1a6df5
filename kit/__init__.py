"""Depth pruning of decoder-only LMs after Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
Layers" (2024). Public names are imported lazily so `import kit` stays fast.

The folders follow the pipeline: core (imports nothing from the rest of the kit), loaders, scan, choose,
prune, healing, evaluate, experiments (sweeps and reading them); families and testing serve the tests and
benchmarks. `kit.data`, `kit.metrics`, `kit.plots`, `kit.readings` and `kit.widgets` are short names of
kit.loaders.data, kit.evaluate.metrics and kit.experiments.plots, .readings and .widgets."""

import sys as _sys

from .core.lazy import lazy as _lazy

__version__ = "0.3.0"

_EXPORTS = {  # the top-level names: each from the module that defines it
    "Run": "run",
    "ScanConfig": "core.config",
    "PruneConfig": "core.config",
    "HealConfig": "core.config",
    "EvaluateConfig": "core.config",
    "SweepConfig": "core.config",
    "CriteriaConfig": "core.config",
    "BudgetConfig": "core.config",
    "HealCompareConfig": "core.config",
    "load_model": "loaders.models",
    "angular_distances": "scan.similarity",
    "Distances": "scan.distances",
    "Block": "core.block",
    "Layers": "core.block",
    "Sublayers": "core.block",
    "Selection": "choose.criteria",
    "drop_layers": "prune",
    "save_pruned": "prune",
    "heal": "healing.train",
    "merge_adapter": "healing.merge",
    "LinearPatchConfig": "healing.linear_patch",
    "ReplacementLayerConfig": "healing.replacement",
    "LastLayersConfig": "healing.last_layers",
}
_MODULES = {  # kit.<name>: the pipeline's steps, the public modules under short names, then the sub-packages
    "steps": "steps",
    "run": "run",
    "data": "loaders.data",
    "metrics": "evaluate.metrics",
    "plots": "experiments.plots",
    "readings": "experiments.readings",
    "widgets": "experiments.widgets",
    **{name: name for name in ["healing", "testing", "families", "core", "loaders", "scan", "choose", "prune", "evaluate",
                               "experiments"]},
}  # fmt: skip

__all__ = [*_EXPORTS, *_MODULES]

# The one alias table: every public name that kit 0.3 moved, old dotted name -> new. Each still works until
# kit 0.4, warning at the caller's line; docs/migration.md lists them (a test keeps the two equal).
_ALIASES = {
    "kit.tiny_model": "kit.testing.tiny_model",
    "kit.TINY_ARCHITECTURES": "kit.testing.TINY_ARCHITECTURES",
    "kit.heuristic_block": "kit.core.block.heuristic_block",
    "kit.dropped": "kit.prune.dropped",
    "kit.mergekit_config": "kit.prune.mergekit_config",
    "kit.choose_block": "kit.choose.criteria.choose_block",
    "kit.choose_units": "kit.choose.criteria.choose_units",
    "kit.greedy_removal": "kit.choose.greedy.greedy_removal",
    "kit.GreedyRemoval": "kit.choose.greedy.GreedyRemoval",
    "kit.compare_sets": "kit.choose.regret.compare_sets",
    "kit.ablation_losses": "kit.choose.oracle.ablation_losses",
    "kit.Ablation": "kit.choose.oracle.Ablation",
    "kit.compare_criteria": "kit.choose.oracle.compare_criteria",
    "kit.HealResult": "kit.healing.train.HealResult",
    "kit.MMLUAccuracy": "kit.metrics.MMLUAccuracy",
    "kit.BoolQAccuracy": "kit.metrics.BoolQAccuracy",
    "kit.RecallAccuracy": "kit.metrics.RecallAccuracy",
    "kit.ValidationLoss": "kit.metrics.ValidationLoss",
    "kit.InferenceCost": "kit.metrics.InferenceCost",
}


def _resolve(dotted: str):
    """The object a dotted name under kit names, importing what it needs: "kit.metrics.MMLUAccuracy"."""
    value = _sys.modules[__name__]
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


def _alias(name: str):
    old = f"{__name__}.{name}"
    if old not in _ALIASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .core.deprecation import warn

    warn(old, _ALIASES[old], stacklevel=4)  # at the line that named kit.<name> (past lazy's __getattr__)
    return _resolve(_ALIASES[old])


__getattr__, __dir__ = _lazy(__name__, _MODULES, _EXPORTS, fallback=_alias)
