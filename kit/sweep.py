"""Pruning sweeps: evaluate one loaded model with every block size n removed, the way the
paper's Figures 2, 3, 5 and 6 do, without reloading or copying the model."""

import copy
from collections.abc import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from . import cost, evaluate, layers, prune
from .prune import Block, dropped

# An evaluation maps (model, tokenizer) to named metrics, e.g. {"mmlu": 0.41}.
Evaluation = Callable[..., dict[str, float]]
STRATEGIES = ("similarity", "heuristic")
CHANCE = {"mmlu": 0.25, "mmlu_subjects": 0.25, "boolq": 0.5}


def mmlu_metrics(questions, *, shots: int = 5, batch_size: int = 8) -> Evaluation:
    """MMLU accuracy, as the mean over questions ("mmlu") and over subjects ("mmlu_subjects")."""

    def run(model, tokenizer):
        result = evaluate.mmlu(model, tokenizer, questions, shots=shots, batch_size=batch_size)
        return {"mmlu": result.accuracy, "mmlu_subjects": result.subject_accuracy}

    return run


def boolq_metrics(items, *, batch_size: int = 8) -> Evaluation:
    """BoolQ 0-shot accuracy ("boolq")."""
    return lambda model, tokenizer: {"boolq": evaluate.boolq(model, tokenizer, items, batch_size=batch_size).accuracy}


def loss_metrics(texts, *, max_length: int = 512, batch_size: int = 8) -> Evaluation:
    """Validation loss in nats ("val_loss") and divided by log(vocab size) ("val_loss_norm")."""

    def run(model, tokenizer):
        result = evaluate.validation_loss(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
        return {"val_loss": result.loss, "val_loss_norm": result.normalized}

    return run


def cost_metrics(*, prompt_tokens: int = 128, new_tokens: int = 32, batch_size: int = 1, repeats: int = 5,
                 threads: int | None = None) -> Evaluation:  # fmt: skip
    """Inference cost (kit.evaluate.cost): parameters, weight and KV bytes, prefill and decode speed, peak memory."""

    def run(model, tokenizer):
        return evaluate.cost(model, tokenizer, prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_size=batch_size,
                             repeats=repeats, threads=threads).metrics()  # fmt: skip

    return run


def evaluate_all(model, tokenizer, evals: Sequence[Evaluation]) -> dict[str, float]:
    """Every metric of every evaluation, in one dict."""
    metrics: dict[str, float] = {}
    for run in evals:
        metrics.update(run(model, tokenizer))
    return metrics


def _load(name, **load_kwargs):
    """A checkpoint with kit.load_model; a (base, adapter) pair gets its LoRA adapter unmerged."""
    from .models import load_model

    if not isinstance(name, tuple):
        return load_model(str(name), **load_kwargs)
    from peft import PeftModel

    base, adapter = name
    model, tokenizer = load_model(str(base), **load_kwargs)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer


def compare(checkpoints: dict, evals: Sequence[Evaluation], **load_kwargs) -> pd.DataFrame:
    """One row per labelled checkpoint (loaded one at a time with kit.load_model): layers,
    parameters and every metric of `evals`, e.g. {"original": "smollm2-135m", "pruned": "runs/x/pruned",
    "healed (adapter)": ("runs/x/pruned", "runs/x/healed/adapter")}; a (base, adapter) pair is
    evaluated with the adapter unmerged. cost_metrics() among `evals` puts the inference cost beside the quality."""
    rows = []
    for label, name in checkpoints.items():
        model, tokenizer = _load(name, **load_kwargs)
        rows.append({"model": label, "layers": layers.num_layers(model), "parameters": cost.parameters(model),
                     **evaluate_all(model, tokenizer, evals)})  # fmt: skip
        del model
    return pd.DataFrame(rows).set_index("model")


def choose_block(num_layers: int, n: int, strategy: str, distances=None, oracle=None) -> Block:
    """The block of n layers a strategy (a criterion of kit.prune.CRITERIA) removes, e.g. the scan's argmin."""
    return prune.choose_block(strategy, num_layers, n, distances=distances, oracle=oracle)


def _rows(metrics: dict[str, float], **columns) -> list[dict]:
    return [{**columns, "metric": name, "value": value} for name, value in metrics.items()]


def sweep(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], distances=None,
    strategy: str = "similarity", heal: Callable | None = None, heal_ns: Sequence[int] = (), oracle=None,
) -> pd.DataFrame:  # fmt: skip
    """Evaluate `model` with n layers removed for every n in `ns` (0 = the unpruned model).

    strategy: a criterion of kit.prune.CRITERIA; "loss" reads `oracle` (kit.ablation_losses on calibration texts).
    Each pruned model is a view of the loaded one (kit.prune.dropped), restored afterwards.
    heal(pruned_model, tokenizer, block) -> healed model is applied to every n in `heal_ns` (it gets
    the pruned view and must not modify it: see healer), and those rows carry healed=True.
    Returns one row per (n, metric): strategy, n, fraction (n / L), start, distance, healed, metric, value.
    """
    num = layers.num_layers(model)
    blocks = {n: choose_block(num, n, strategy, distances, oracle) for n in ns if n != 0}
    if missing := set(heal_ns) - set(blocks):
        raise ValueError(f"heal_ns {sorted(missing)} must be non-zero block sizes that are also in ns")
    if heal_ns and heal is None:
        raise ValueError("heal_ns needs a heal function, e.g. kit.sweep.healer(...)")
    rows = []
    for n in tqdm(ns, desc=f"sweep ({strategy})", unit="n"):
        block = blocks.get(n)
        columns = dict(
            strategy=strategy, n=n, fraction=n / num,
            start=block.start if block else None, distance=block.distance if block else None,
        )  # fmt: skip
        if block is None:
            rows += _rows(evaluate_all(model, tokenizer, evals), **columns, healed=False)
            continue
        with dropped(model, block):
            rows += _rows(evaluate_all(model, tokenizer, evals), **columns, healed=False)
            if n in heal_ns:
                healed = heal(model, tokenizer, block)  # from the pruned view; heal must leave it untouched
                rows += _rows(evaluate_all(healed, tokenizer, evals), **columns, healed=True)
                del healed
    return pd.DataFrame(rows)


def healer(texts: list[str], config, *, output_root, val_texts=None) -> Callable:
    """A `heal` function for sweep(): kit.heal with `config` on `texts`, adapters under output_root/n{n}.
    The loaded model is never copied for a 4-bit heal; with config.quantize=None the pruned model is."""
    from pathlib import Path

    from .healing import heal as heal_model

    def run(pruned, tokenizer, block: Block):
        output_dir = Path(output_root) / f"n{block.n}"
        # a 4-bit heal re-loads the pruned weights quantized; LoRA on the full-precision base needs its own copy
        base = pruned if config.quantize else copy.deepcopy(pruned)
        return heal_model(base, tokenizer, texts, config, output_dir=output_dir, val_texts=val_texts).model

    return run
