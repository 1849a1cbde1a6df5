"""Depth pruning of decoder-only LMs after Gromov et al., "The Unreasonable Ineffectiveness
of the Deeper Layers" (2024). Public names are imported lazily so `import kit` stays fast."""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "load_model": "models",
    "tiny_model": "testing",
    "TINY_ARCHITECTURES": "testing",
    "Block": "block",
    "heuristic_block": "block",
    "drop_layers": "prune",
    "save_pruned": "prune",
    "mergekit_config": "prune",
    "Selection": "prune",
    "choose_block": "prune",
    "dropped": "prune",
    "angular_distances": "similarity",
    "Distances": "distances",
    "ablation_losses": "oracle",
    "Ablation": "oracle",
    "compare_criteria": "oracle",
    "ScanConfig": "config",
    "PruneConfig": "config",
    "HealConfig": "config",
    "heal": "healing",
    "merge_adapter": "merge",
    "HealResult": "healing",
    "MMLUAccuracy": "metrics",
    "BoolQAccuracy": "metrics",
    "RecallAccuracy": "metrics",
    "ValidationLoss": "metrics",
    "InferenceCost": "metrics",
}

__all__ = sorted(_EXPORTS) + [
    "artifacts", "assets", "block", "boolq", "config", "cost", "curves", "data", "deprecation", "device", "distances", "distributed",
    "evaluate", "families", "harness", "healing", "layers", "loss", "merge", "metrics", "mmlu", "models", "oracle", "plots",
    "progress", "prune", "readings", "recall", "reports", "results", "scoring", "similarity", "stats", "sweep", "testing", "text",
    "widgets",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"kit.{_EXPORTS[name]}"), name)
    if name in __all__:
        return import_module(f"kit.{name}")
    raise AttributeError(f"module 'kit' has no attribute {name!r}")


def __dir__():
    """The lazy names too, so that tab completion in Jupyter shows them."""
    return sorted({*globals(), *__all__})
