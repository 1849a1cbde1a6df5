"""Evaluations: functions (model, tokenizer) -> named metrics with their 95% intervals, which
`sweep.sweep` and `sweep.compare` run on every model they evaluate. One `<name>_metrics` per benchmark."""

from collections.abc import Callable, Sequence

from . import distributed, evaluate
from .stats import Z95, Estimate, side

# An evaluation maps (model, tokenizer) to named metrics: floats, or Estimates with their interval,
# e.g. {"mmlu": Estimate(0.41, 0.27, 0.56, outcomes, chance=0.25)}.
Evaluation = Callable[..., dict[str, float | Estimate]]
CHANCE = {"mmlu": 0.25, "mmlu_subjects": 0.25, "boolq": 0.5}  # fixed by the benchmark; recall's rows carry theirs


def above_chance(estimate: Estimate, force: bool | None = None) -> bool:
    """Whether an accuracy means something: `force` when given (True / False), else whether its 95%
    interval lies above its chance level (notebook 04 sweeps MMLU only then, unless told)."""
    return bool(force) if force is not None else side(estimate.low, estimate.high, estimate.chance) == "above"


def mmlu_metrics(questions, *, shots: int = 5, batch_size: int = 8) -> Evaluation:
    """MMLU accuracy, as the mean over questions ("mmlu") and over subjects ("mmlu_subjects")."""

    def run(model, tokenizer):
        result = evaluate.mmlu(model, tokenizer, questions, shots=shots, batch_size=batch_size)
        return {
            "mmlu": Estimate(result.accuracy, *result.ci, result.correct, CHANCE["mmlu"]),
            "mmlu_subjects": Estimate(result.subject_accuracy, *result.subject_ci, chance=CHANCE["mmlu_subjects"]),
        }

    return run


def boolq_metrics(items, *, batch_size: int = 8) -> Evaluation:
    """BoolQ 0-shot accuracy ("boolq")."""

    def run(model, tokenizer):
        result = evaluate.boolq(model, tokenizer, items, batch_size=batch_size)
        return {"boolq": Estimate(result.accuracy, *result.ci, result.correct, CHANCE["boolq"])}

    return run


def recall_metrics(items, *, batch_size: int = 8) -> Evaluation:
    """In-context recall accuracy ("recall", kit.recall), carrying its chance level 1 / facts."""

    def run(model, tokenizer):
        result = evaluate.recall(model, tokenizer, items, batch_size=batch_size)
        return {"recall": Estimate(result.accuracy, *result.ci, result.correct, result.chance)}

    return run


def loss_metrics(texts, *, max_length: int = 512, batch_size: int = 8) -> Evaluation:
    """Validation loss in nats ("val_loss") and divided by log(vocab size) ("val_loss_norm")."""

    def run(model, tokenizer):
        result = evaluate.validation_loss(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
        half = Z95 * result.stderr  # normal 95% interval from the standard error over texts
        scale = result.normalized / result.loss
        return {
            "val_loss": Estimate(result.loss, result.loss - half, result.loss + half),
            "val_loss_norm": Estimate(result.normalized, (result.loss - half) * scale, (result.loss + half) * scale),
        }

    return run


def cost_metrics(*, prompt_tokens: int = 128, new_tokens: int = 32, batch_size: int = 1, repeats: int = 5,
                 threads: int | None = None) -> Evaluation:  # fmt: skip
    """Inference cost (kit.evaluate.cost): parameters, weight and KV bytes, prefill and decode speed, peak memory."""

    def run(model, tokenizer):  # timed on rank 0 alone under torch.distributed, so every rank reports one measurement
        return distributed.on_main(lambda: evaluate.cost(model, tokenizer, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                                         batch_size=batch_size, repeats=repeats, threads=threads).metrics())  # fmt: skip

    return run


def evaluate_all(model, tokenizer, evals: Sequence[Evaluation]) -> dict[str, Estimate]:
    """Every metric of every evaluation, in one dict (plain floats become Estimates without interval)."""
    metrics: dict[str, Estimate] = {}
    for run in evals:
        metrics.update({k: v if isinstance(v, Estimate) else Estimate(float(v)) for k, v in run(model, tokenizer).items()})
    return metrics
