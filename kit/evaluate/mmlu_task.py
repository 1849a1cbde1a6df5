"""MMLU in the original Hendrycks format, exactly as lm-evaluation-harness writes it, scored by the
log-likelihood of " A".." D"; within a subject the few-shot prefix runs once (KV cache)."""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core import distributed
from ..core.progress import progress
from ..core.stats import subject_mean_interval, wilson
from ..loaders.data import LETTERS, MMLUQuestion, format_mmlu_question, mmlu_fewshot_pool
from .scoring import encode_request, loglikelihoods


@dataclass(frozen=True)
class MMLUResult:
    accuracy: float  # mean over questions
    subject_accuracy: float  # mean over subjects of each subject's accuracy
    by_subject: pd.DataFrame  # columns subject, n, accuracy; one row per subject, sorted by name
    predictions: list[str]  # predicted letter per question, in input order
    loglikelihoods: np.ndarray  # (questions, 4): log p(" A".." D" | prompt)
    correct: np.ndarray  # bool per question, in input order
    ci: tuple[float, float]  # Wilson 95% interval of accuracy
    subject_ci: tuple[float, float]  # 95% interval of subject_accuracy: bootstrap over questions within subjects


def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def fewshot_prefix(subject: str, shots: list[MMLUQuestion]) -> str:
    """The subject header and the answered shots that every prompt of `subject` starts with."""
    return subject_header(subject) + "".join(f"{format_mmlu_question(shot)} {LETTERS[shot.answer]}\n\n" for shot in shots)


def mmlu_prompt(question: MMLUQuestion, shots: list[MMLUQuestion]) -> str:
    """The full prompt for `question`, ending in "Answer:"."""
    return fewshot_prefix(question.subject, shots) + format_mmlu_question(question)


def fewshot_examples(fewshot, subject: str, shots: int) -> list[MMLUQuestion]:
    """The first `shots` questions of `fewshot(subject)`."""
    pool = list(fewshot(subject))
    if len(pool) < shots:
        raise ValueError(f"the few-shot pool of {subject!r} holds {len(pool)} questions, fewer than shots={shots}")
    return pool[:shots]


def indices_by_subject(questions: list[MMLUQuestion]) -> dict[str, list[int]]:
    """Positions of the questions of each subject, in order of first appearance."""
    groups = defaultdict(list)
    for i, question in enumerate(questions):
        groups[question.subject].append(i)
    return dict(groups)


def result_from_loglikelihoods(questions: list[MMLUQuestion], loglik: np.ndarray) -> MMLUResult:
    """Predictions (most likely letter) and accuracies from the (questions, 4) log-likelihoods."""
    chosen = loglik.argmax(axis=1)
    table = pd.DataFrame({"subject": [q.subject for q in questions], "correct": chosen == [q.answer for q in questions]})
    by_subject = table.groupby("subject", sort=True)["correct"].agg(n="size", accuracy="mean").reset_index()
    return MMLUResult(
        accuracy=float(table["correct"].mean()),
        subject_accuracy=float(by_subject["accuracy"].mean()),
        by_subject=by_subject,
        predictions=[LETTERS[c] for c in chosen],
        loglikelihoods=loglik,
        correct=table["correct"].to_numpy(),
        ci=wilson(int(table["correct"].sum()), len(table)),
        subject_ci=subject_mean_interval(table["correct"], table["subject"]),
    )


def mmlu(model, tokenizer, questions: list[MMLUQuestion], *, shots: int = 5, batch_size: int = 8,
         fewshot=mmlu_fewshot_pool, naive: bool = False) -> MMLUResult:  # fmt: skip
    """k-shot MMLU accuracy of `model` on `questions` (paper: 5-shot, original Hendrycks format).

    Shots are the first `shots` questions of `fewshot(subject)` (default: the embedded pool; pass
    the Hub's dev split for the original shots). The prediction is the letter whose continuation
    " A".." D" is most likely, scored as lm-eval scores it: when each letter is one token (most
    tokenizers) that is the largest next-token logit; when a tokenizer splits " B" into " " + "B",
    the continuation's full log-likelihood counts. `naive=True` runs one full forward per question
    without cache or batching: the reference the fast path reproduces.
    """
    if not questions:
        raise ValueError("mmlu needs at least one question, e.g. kit.loaders.data.mmlu_questions(per_subject=10)")
    distributed.require_same("MMLU", dict(questions=distributed.digest(questions), shots=shots, batch_size=batch_size,
        naive=naive, fewshot={s: distributed.digest(fewshot_examples(fewshot, s, shots)) for s in indices_by_subject(questions)}))  # fmt: skip
    mine = distributed.weighted_shard([len(format_mmlu_question(q)) for q in questions])  # this rank's questions
    local = [questions[i] for i in mine]
    loglik = torch.zeros(len(local), len(LETTERS), dtype=torch.float64)
    subjects = indices_by_subject(local).items()
    for subject, indices in progress(subjects, desc="MMLU subjects", show=distributed.is_main()):
        examples = fewshot_examples(fewshot, subject, shots)
        requests = [
            encode_request(tokenizer, mmlu_prompt(local[i], examples), f" {letter}")
            for i in indices
            for letter in LETTERS
        ]
        scores = loglikelihoods(model, requests, batch_size=1 if naive else batch_size, cache_prefix=not naive)
        loglik[indices] = torch.tensor(scores, dtype=torch.float64).view(len(indices), len(LETTERS))
    loglik = distributed.assemble(loglik, mine, len(questions)).numpy()
    return result_from_loglikelihoods(questions, loglik)
