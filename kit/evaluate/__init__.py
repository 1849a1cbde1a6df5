"""Evaluation as the paper reports it, in one place: MMLU (5-shot, original format), BoolQ (0-shot),
validation loss, inference cost; optionally MMLU through lm-evaluation-harness; in-context recall,
a question-answering stand-in for MMLU on models too small for it. Each benchmark lives in its own
module (`mmlu_task`, `boolq_task`, `recall_task`, `loss`, `inference_cost`, `harness`, on the
log-likelihoods of `scoring`); `metrics` makes each an evaluation value, the ones sweeps run.
This package gathers the functions, imported on first use: `kit.evaluate.mmlu(model, tokenizer, questions)`.
No submodule is named after a function here, so importing one never hides the function."""

from ..core.lazy import lazy as _lazy

_EXPORTS = {
    "mmlu": "mmlu_task", "MMLUResult": "mmlu_task", "boolq": "boolq_task", "BoolQResult": "boolq_task",
    "recall": "recall_task", "RecallResult": "recall_task", "validation_loss": "loss", "LossResult": "loss",
    "cost": "inference_cost", "CostResult": "inference_cost", "lm_eval_mmlu": "harness",
}  # fmt: skip
MODULES = ["boolq_task", "harness", "inference_cost", "loss", "metrics", "mmlu_task", "recall_task", "scoring"]

__all__ = ["mmlu", "boolq", "recall", "validation_loss", "lm_eval_mmlu", "cost", "MMLUResult", "BoolQResult", "RecallResult",
           "LossResult", "CostResult"]
__getattr__, __dir__ = _lazy(__name__, MODULES, _EXPORTS)
