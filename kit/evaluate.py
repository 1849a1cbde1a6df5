"""Evaluation as the paper reports it, in one place: MMLU (5-shot, original format), BoolQ (0-shot),
validation loss, inference cost; optionally MMLU through lm-evaluation-harness. Each benchmark
lives in its own module; this facade only gathers them."""

from .boolq import BoolQResult, boolq
from .cost import CostResult, cost
from .harness import lm_eval_mmlu
from .loss import LossResult, validation_loss
from .mmlu import MMLUResult, mmlu

__all__ = ["mmlu", "boolq", "validation_loss", "lm_eval_mmlu", "cost", "MMLUResult", "BoolQResult", "LossResult", "CostResult"]
