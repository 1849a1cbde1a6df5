"""Depth pruning of decoder-only LMs after Gromov et al., "The Unreasonable Ineffectiveness
of the Deeper Layers" (2024). Public names are imported lazily so `import kit` stays fast.

The folders follow the pipeline: core (imports nothing from the rest of the kit), loaders, scan,
choose, prune, healing, evaluate, experiments (sweeps and reading them); families and testing
serve the tests and benchmarks."""

import os as _os

from .core.lazy import lazy as _lazy

__version__ = "0.2.0"

_EXPORTS = {
    "load_model": "loaders.models",
    "tiny_model": "testing",
    "TINY_ARCHITECTURES": "testing",
    "Block": "core.block",
    "Layers": "core.block",
    "Sublayers": "core.block",
    "heuristic_block": "core.block",
    "drop_layers": "prune",
    "save_pruned": "prune",
    "mergekit_config": "prune",
    "dropped": "prune",
    "Selection": "choose.criteria",
    "choose_block": "choose.criteria",
    "choose_units": "choose.criteria",
    "compare_sets": "choose.regret",
    "greedy_removal": "choose.greedy",
    "GreedyRemoval": "choose.greedy",
    "angular_distances": "scan.similarity",
    "Distances": "scan.distances",
    "ablation_losses": "choose.oracle",
    "Ablation": "choose.oracle",
    "compare_criteria": "choose.oracle",
    "ScanConfig": "core.config",
    "PruneConfig": "core.config",
    "HealConfig": "core.config",
    "heal": "healing.train",
    "merge_adapter": "healing.merge",
    "HealResult": "healing.train",
    "heal_cut": "healing.methods",
    "HEALERS": "healing.methods",
    "Healed": "healing.methods",
    "LinearPatchConfig": "healing.linear_patch",
    "ReplacementLayerConfig": "healing.replacement",
    "LastLayersConfig": "healing.last_layers",
    "MMLUAccuracy": "evaluate.metrics",
    "BoolQAccuracy": "evaluate.metrics",
    "RecallAccuracy": "evaluate.metrics",
    "ValidationLoss": "evaluate.metrics",
    "InferenceCost": "evaluate.metrics",
}
_MODULES = ["core", "loaders", "scan", "choose", "prune", "healing", "evaluate", "experiments", "families", "testing"]

__all__ = sorted(_EXPORTS) + _MODULES

# The module paths of 0.1 (kit.similarity, kit.prune's choose_block, ...) still import, from one stub
# each in kit/_moved/, and warn with the new home on use; they go in kit 0.3 with that folder.
_MOVED = _os.path.join(_os.path.dirname(__file__), "_moved")
__path__.append(_MOVED)


def _old_module(name):
    if _os.path.isfile(_os.path.join(_MOVED, f"{name}.py")):
        from importlib import import_module

        return import_module(f"kit.{name}")
    raise AttributeError(f"module 'kit' has no attribute {name!r}")


__getattr__, __dir__ = _lazy(__name__, _MODULES, _EXPORTS, fallback=_old_module)
