"""The pipeline's steps: each one function of (run, config) that reads its inputs from the run folder and
writes its artifacts there (kit.run.ARTIFACTS). The notebooks and the command line (`python -m kit STEP
--run DIR`, one flag per config field) are two faces of the same functions.

    run = kit.Run("runs/llama")
    kit.steps.scan(run, kit.ScanConfig(model_name="meta-llama/Llama-3.1-8B"))
    kit.steps.prune(run, kit.PruneConfig(n=8))
    kit.steps.heal(run, kit.HealConfig(steps=500))
    kit.steps.evaluate(run, kit.EvaluateConfig())
"""

from dataclasses import dataclass

from ..core.config import (
    BudgetConfig,
    CriteriaConfig,
    EvaluateConfig,
    HealCompareConfig,
    HealConfig,
    PruneConfig,
    ScanConfig,
    SweepConfig,  # fmt: skip
)
from ..core.lazy import lazy as _lazy


@dataclass(frozen=True)
class Step:
    """A step of the pipeline, as the command line lists it."""

    module: str  # kit.steps.<module> defines the step's function (a module of another name: kit.steps.scan is the function)
    config: type | None  # its settings dataclass (None: it takes none)
    help: str


STEPS = {
    "scan": Step("similarity", ScanConfig, "layer-similarity scan -> distances.safetensors, choices.csv (notebook 01)"),
    "prune": Step("pruning", PruneConfig, "choose the block, remove it, save the pruned checkpoint, loss before and after (notebook 02)"),
    "heal": Step("healing", HealConfig, "heal the cut (--method: qlora, the paper's, or another method), a plain checkpoint, losses (notebook 03)"),
    "evaluate": Step("evaluation", EvaluateConfig, "original, pruned and healed checkpoints on recall, MMLU, loss and cost (notebook 04)"),
    "sweep": Step("evaluation", SweepConfig, "the evaluations at every block size per criterion, with healed twins (notebook 04)"),
    "criteria": Step("oracle", CriteriaConfig, "scan metrics judged by the ablation oracle's held-out loss (notebook 05)"),
    "budget": Step("granularity", BudgetConfig, "blocks, layer sets and sublayers at the same parameter budgets (notebook 06)"),
    "heal_compare": Step("heal_comparison", HealCompareConfig, "every healing method on the same cuts against their cost (notebook 07)"),
    "report": Step("reporting", None, "the readings of every step the run has -> report.md"),
}

__all__ = list(STEPS)
__getattr__, __dir__ = _lazy(__name__, sorted({step.module for step in STEPS.values()}), {name: step.module for name, step in STEPS.items()})
