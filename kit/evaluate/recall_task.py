"""In-context recall: a question-answering probe small models pass and lose as layers go. The
context lists `facts` lines "The code for {name} is {code}.", the query repeats one line up to
"is", and the prediction is the code of the context whose continuation " {code}" is most likely
(lm-evaluation-harness's rule). A stand-in for MMLU on models too small for it: chance is 1 / facts."""

import random
from dataclasses import dataclass

import numpy as np

from ..core.stats import wilson
from .scoring import choice_loglikelihoods

# Fixed word lists: items are generated in-process, the same on every machine.
NAMES = ("Anna", "Boris", "Clara", "David", "Emma", "Frank", "Grace", "Hugo", "Iris", "James", "Kate", "Leo",
         "Maria", "Nina", "Oscar", "Paul", "Quinn", "Rosa", "Simon", "Tara", "Victor", "Wendy", "Alex", "Ben")  # fmt: skip
CODES = ("apple", "river", "candle", "tiger", "window", "silver", "garden", "rocket", "pencil", "forest", "mirror",
         "violin", "harbor", "lemon", "castle", "thunder", "pepper", "marble", "falcon", "anchor", "velvet", "comet")  # fmt: skip


@dataclass(frozen=True)
class RecallItem:
    context: str  # `facts` lines "The code for X is Y.\n"
    query: str  # "The code for X is": the prompt's last line, answered by " Y"
    answer: str  # the code of the queried name
    candidates: tuple[str, ...]  # every code of the context, in context order

    @property
    def prompt(self) -> str:
        return self.context + self.query


@dataclass(frozen=True)
class RecallResult:
    accuracy: float
    predictions: list[str]  # predicted code per item, in input order
    loglikelihoods: np.ndarray  # (items, candidates): log p(" code" | prompt)
    correct: np.ndarray  # bool per item, in input order
    ci: tuple[float, float]  # Wilson 95% interval of accuracy
    chance: float  # the expected accuracy of a uniform guess among the candidates


def recall_items(n: int = 40, *, facts: int = 6, seed: int = 0) -> list[RecallItem]:
    """`n` recall items, deterministic in `seed`: distinct names and codes drawn from fixed word
    lists; item k asks for the fact at position k mod `facts`, so every position is asked equally.

    Args:
        n: number of items. facts: lines of context, hence candidates per item (chance 1 / facts).
        seed: the draw of names and codes.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 2 <= facts <= min(len(NAMES), len(CODES)):
        raise ValueError(f"facts must be between 2 and {min(len(NAMES), len(CODES))} (one candidate per fact), got {facts}")
    rng, items = random.Random(seed), []
    for k in range(n):
        names, codes = rng.sample(NAMES, facts), rng.sample(CODES, facts)
        context = "".join(f"The code for {name} is {code}.\n" for name, code in zip(names, codes))
        asked = k % facts
        items.append(RecallItem(context, f"The code for {names[asked]} is", codes[asked], tuple(codes)))
    return items


def recall(model, tokenizer, items: list[RecallItem], *, batch_size: int = 8) -> RecallResult:
    """Recall accuracy: each item's prediction is its most likely candidate " code" after the prompt.

    Candidates of one item that are single tokens share one forward (kit.evaluate.scoring groups them).
    """
    if not items:
        raise ValueError("recall needs at least one item, e.g. kit.evaluate.recall_task.recall_items(40)")
    if bad := [i for i, item in enumerate(items) if item.answer not in item.candidates]:
        raise ValueError(f"items {bad[:5]} have an answer that is not among their candidates")
    widths = {len(item.candidates) for item in items}
    if len(widths) > 1:
        raise ValueError(f"items have different numbers of candidates {sorted(widths)}: evaluate each kind on its own")
    candidates = [tuple(f" {code}" for code in item.candidates) for item in items]
    loglik = choice_loglikelihoods(model, tokenizer, [item.prompt for item in items], candidates, what="recall",
                                   batch_size=batch_size)  # fmt: skip
    predictions = [item.candidates[c] for item, c in zip(items, loglik.argmax(axis=1))]
    correct = np.array([p == item.answer for p, item in zip(predictions, items)])
    ci = wilson(int(correct.sum()), len(correct))
    return RecallResult(float(correct.mean()), predictions, loglik, correct, ci, 1 / loglik.shape[1])
