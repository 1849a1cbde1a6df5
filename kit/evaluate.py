"""Evaluation as the paper reports it, in one place: MMLU (5-shot, original format), BoolQ (0-shot),
validation loss, inference cost; optionally MMLU through lm-evaluation-harness; in-context recall,
a question-answering stand-in for MMLU on models too small for it. Each benchmark
lives in its own module; this facade only gathers them."""

from .boolq import BoolQResult, boolq
from .cost import CostResult, cost
from .harness import lm_eval_mmlu
from .loss import LossResult, validation_loss
from .mmlu import MMLUResult, mmlu
from .recall import RecallResult, recall

__all__ = ["mmlu", "boolq", "recall", "validation_loss", "lm_eval_mmlu", "cost", "MMLUResult", "BoolQResult", "RecallResult",
           "LossResult", "CostResult"]
