"""Evaluations as values: each is a frozen dataclass holding its data and parameters, with a name, the
metrics it reports, their chance level, `run(model, tokenizer)` -> those metrics with their 95%
intervals, and a digest that covers every parameter and the identity of its data (what keys a sweep's
cache, kit.experiments.sweep). `EVALUATIONS` registers them by name, as lm-evaluation-harness registers tasks:

    evals = [MMLUAccuracy(kit.loaders.data.mmlu_questions(), shots=5), ValidationLoss(texts, max_length=256)]
    evaluation("mmlu", questions=questions, shots=0)  # the same, by name

An evaluation of your own: a frozen dataclass subclassing `Evaluation`, decorated with `@register`."""

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from ..core import distributed
from ..core.stats import Z95, Estimate, side
from . import boolq_task, inference_cost, loss, mmlu_task, recall_task

EVALUATIONS: dict[str, type["Evaluation"]] = {}  # name -> class


def register(cls: type["Evaluation"]) -> type["Evaluation"]:
    """Class decorator: `cls` becomes evaluation(cls.name, ...)."""
    if not cls.name or cls.name in EVALUATIONS:
        raise ValueError(f"an evaluation needs a name of its own: {cls.name!r} is {'taken' if cls.name else 'empty'}")
    EVALUATIONS[cls.name] = cls
    return cls


def evaluation(name: str, **params) -> "Evaluation":
    """The registered evaluation `name` with `params`, e.g. evaluation("loss", texts=texts, max_length=256)."""
    if name not in EVALUATIONS:
        raise ValueError(f"no evaluation {name!r}; registered: {', '.join(sorted(EVALUATIONS))}")
    return EVALUATIONS[name](**params)


def _canonical(value):
    if dataclasses.is_dataclass(value):
        return {k: _canonical(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot digest a {type(value).__name__}: an evaluation's data are strings and dataclasses of them")


def identity(value):
    """A parameter as recorded in a cache: scalars as they are, data (a sequence) as its size and digest."""
    if isinstance(value, list | tuple):
        data = json.dumps(_canonical(value), sort_keys=True, ensure_ascii=False).encode()
        return f"{len(value)} items, sha256 {hashlib.sha256(data).hexdigest()[:16]}"
    return _canonical(value)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An evaluation: subclasses are frozen dataclasses whose fields are all its parameters and data."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()  # the names of the metrics run() returns
    chance: ClassVar[float | None] = None  # a uniform guess's accuracy; None for metrics without one

    def __post_init__(self):
        for field in dataclasses.fields(self):  # data as tuples: the evaluation cannot change under its digest
            if isinstance(value := getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(value))

    def run(self, model, tokenizer) -> dict[str, Estimate]:
        raise NotImplementedError

    def __call__(self, model, tokenizer) -> dict[str, Estimate]:
        return self.run(model, tokenizer)

    def settings(self) -> dict:
        """Every parameter, JSON-able (data as size and digest): what a cache records and compares."""
        return {field.name: identity(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def digest(self) -> str:
        """A hash of the name and every setting: two evaluations with equal digests give the same metrics."""
        data = json.dumps({"evaluation": self.name, **self.settings()}, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:16]


def _accuracy(result, chance: float) -> Estimate:
    return Estimate(result.accuracy, *result.ci, result.correct, chance)


@register
@dataclasses.dataclass(frozen=True)
class MMLUAccuracy(Evaluation):
    """MMLU accuracy (kit.evaluate.mmlu, few-shot in the original format), as the mean over questions
    ("mmlu") and over subjects ("mmlu_subjects").

    Args:
        questions: kit.loaders.data.mmlu_questions(...).
        shots: few-shot examples per prompt, from each subject's dev split (paper: 5).
        batch_size: prompts per forward pass.
    """

    name = "mmlu"
    metrics = ("mmlu", "mmlu_subjects")
    chance = 0.25

    questions: tuple
    shots: int = 5
    batch_size: int = 8

    def settings(self) -> dict:
        from ..loaders.data import mmlu_fewshot_pool  # the few-shot examples are data of this evaluation too

        subjects = sorted({q.subject for q in self.questions})
        return {**super().settings(), "fewshot": identity([mmlu_fewshot_pool(s)[: self.shots] for s in subjects])}

    def run(self, model, tokenizer):
        result = mmlu_task.mmlu(model, tokenizer, list(self.questions), shots=self.shots, batch_size=self.batch_size)
        return {
            "mmlu": _accuracy(result, self.chance),
            "mmlu_subjects": Estimate(result.subject_accuracy, *result.subject_ci, chance=self.chance),
        }


@register
@dataclasses.dataclass(frozen=True)
class BoolQAccuracy(Evaluation):
    """BoolQ 0-shot accuracy ("boolq", kit.evaluate.boolq).

    Args:
        items: kit.loaders.data.boolq_items(...).
        batch_size: prompts per forward pass.
    """

    name = "boolq"
    metrics = ("boolq",)
    chance = 0.5

    items: tuple
    batch_size: int = 8

    def run(self, model, tokenizer):
        return {"boolq": _accuracy(boolq_task.boolq(model, tokenizer, list(self.items), batch_size=self.batch_size), self.chance)}


@register
@dataclasses.dataclass(frozen=True)
class RecallAccuracy(Evaluation):
    """In-context recall accuracy ("recall", kit.evaluate.recall_task): chance is 1 / facts.

    Args:
        items: kit.evaluate.recall_task.recall_items(...), all with the same number of facts.
        batch_size: prompts per forward pass.
    """

    name = "recall"
    metrics = ("recall",)

    items: tuple
    batch_size: int = 8

    @property
    def chance(self) -> float:
        return 1 / len(self.items[0].candidates)

    def run(self, model, tokenizer):
        return {"recall": _accuracy(recall_task.recall(model, tokenizer, list(self.items), batch_size=self.batch_size), self.chance)}


@register
@dataclasses.dataclass(frozen=True)
class ValidationLoss(Evaluation):
    """Validation loss in nats per token ("val_loss") and divided by log(vocabulary size) ("val_loss_norm"),
    with a normal 95% interval from the standard error over texts, and each text's summed loss and
    tokens (what paired comparisons of two models on the same texts resample).

    Args:
        texts: the validation texts, e.g. kit.loaders.data.corpus("validation")[:16].
        max_length: tokens per text (longer ones are cut).
        batch_size: texts per forward pass.
    """

    name = "loss"
    metrics = ("val_loss", "val_loss_norm")

    texts: tuple
    max_length: int = 512
    batch_size: int = 8

    def run(self, model, tokenizer):
        result = loss.validation_loss(model, tokenizer, list(self.texts), max_length=self.max_length, batch_size=self.batch_size)
        half = Z95 * result.stderr
        scale = result.normalized / result.loss
        per_text = np.stack([result.text_losses, result.text_tokens], axis=1)
        return {
            "val_loss": Estimate(result.loss, result.loss - half, result.loss + half, per_text=per_text),
            "val_loss_norm": Estimate(result.normalized, (result.loss - half) * scale, (result.loss + half) * scale,
                                      per_text=per_text * [scale, 1]),  # fmt: skip
        }


@register
@dataclasses.dataclass(frozen=True)
class InferenceCost(Evaluation):
    """Inference cost (kit.evaluate.cost): parameters, weight and KV-cache bytes, prefill and decode
    speed, peak memory; timed on rank 0 alone under torch.distributed, so every rank reports one measurement.

    Args:
        prompt_tokens: tokens per prompt when timing the prefill.
        new_tokens: tokens generated greedily with the KV cache when timing decoding.
        batch_size: sequences per timed call.
        repeats: timed repeats (the median is reported).
        threads: CPU threads while timing (None: torch's setting).
    """

    name = "cost"
    metrics = ("parameters", "weight_bytes", "kv_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
               "time_to_first_token_s", "peak_memory_bytes", "prefill_spread", "decode_spread")  # fmt: skip

    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    repeats: int = 5
    threads: int | None = None

    def run(self, model, tokenizer):
        settings = dataclasses.asdict(self)
        return distributed.on_main(lambda: inference_cost.cost(model, tokenizer, **settings).metrics())


def evaluate_all(model, tokenizer, evals: Sequence[Evaluation | Callable]) -> dict[str, Estimate]:
    """Every metric of every evaluation, in one dict (plain floats become Estimates without interval)."""
    metrics: dict[str, Estimate] = {}
    for run in evals:
        found = run(model, tokenizer)
        if clash := set(found) & set(metrics):
            raise ValueError(f"two evaluations report {sorted(clash)}: evaluate each kind once per sweep or comparison")
        metrics.update({k: v if isinstance(v, Estimate) else Estimate(float(v)) for k, v in found.items()})
    return metrics


def above_chance(estimate: Estimate, force: bool | None = None) -> bool:
    """Whether an accuracy means something: `force` when given (True / False), else whether its 95%
    interval lies above its chance level (notebook 04 sweeps MMLU only then, unless told)."""
    if force is not None:
        return bool(force)
    return not math.isnan(estimate.chance) and side(estimate.low, estimate.high, estimate.chance) == "above"

