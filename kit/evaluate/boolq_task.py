"""BoolQ 0-shot as the paper scores it: `"{passage}\nQuestion: {question}?\nAnswer:"`, the answer is
whichever of " no" / " yes" is more likely (lm-evaluation-harness's rule)."""

from dataclasses import dataclass

import numpy as np

from ..core.stats import wilson
from ..loaders.data import BoolQItem
from .scoring import choice_loglikelihoods


@dataclass(frozen=True)
class BoolQResult:
    accuracy: float
    predictions: list[bool]  # per item, in input order
    loglikelihoods: np.ndarray  # (items, 2): log p(" no" | prompt), log p(" yes" | prompt)
    correct: np.ndarray  # bool per item, in input order
    ci: tuple[float, float]  # Wilson 95% interval of accuracy


def boolq_prompt(item: BoolQItem) -> str:
    return f"{item.passage}\nQuestion: {item.question}?\nAnswer:"


def boolq(model, tokenizer, items: list[BoolQItem], *, batch_size: int = 8) -> BoolQResult:
    """0-shot BoolQ accuracy: the answer is whichever of " no" / " yes" is more likely (lm-eval's rule)."""
    if not items:
        raise ValueError("boolq needs at least one item, e.g. kit.loaders.data.boolq_items('hub', n=500)")
    loglik = choice_loglikelihoods(model, tokenizer, [boolq_prompt(item) for item in items], [(" no", " yes")] * len(items),
                                   what="BoolQ", batch_size=batch_size, cache_prefix=False)  # fmt: skip
    predictions = [bool(choice) for choice in loglik.argmax(axis=1)]
    correct = np.array([p == item.answer for p, item in zip(predictions, items)])
    return BoolQResult(float(correct.mean()), predictions, loglik, correct, wilson(int(correct.sum()), len(correct)))
