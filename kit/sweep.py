"""Pruning sweeps: evaluate one loaded model with every block size n removed, the way the
paper's Figures 2, 3, 5 and 6 do, without reloading or copying the model."""

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import artifacts, cost, evaluate, layers
from .device import provenance
from .prune import Block, dropped, heuristic_block

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


def choose_block(num_layers: int, n: int, strategy: str, distances=None) -> Block:
    """The block of n layers a strategy removes: the scan's argmin, or the paper's heuristic."""
    if strategy == "similarity":
        if distances is None:
            raise ValueError("strategy='similarity' needs the distances of a scan (notebook 01_similarity)")
        if distances.num_layers != num_layers:
            raise ValueError(f"the distances describe {distances.num_layers} layers, the model has {num_layers}")
        return distances.best_block(n)
    if strategy == "heuristic":
        return heuristic_block(num_layers, n)
    raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy / torch scalars -> Python


def _rows(metrics: dict[str, float], **columns) -> list[dict]:
    columns = {k: _plain(v) for k, v in columns.items()}
    return [{**columns, "metric": name, "value": _plain(value)} for name, value in metrics.items()]


class _Cache:
    """The finished points of a sweep in one JSON file, rewritten atomically after each point,
    with the settings that produced them: a rerun with the same settings skips them."""

    def __init__(self, path, settings: dict):
        self.path, self.settings, self.points = path, settings, {}
        if path is None or not Path(path).exists():
            return
        try:
            cached = json.loads(Path(path).read_text())
            old, points = cached["settings"], cached["points"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a sweep cache ({error}); delete it or pass another cache_path") from None
        if old != settings:
            changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            raise ValueError(f"{path} holds a sweep made with other settings ({'; '.join(changed)}); "
                             "delete it or pass another cache_path")  # fmt: skip
        self.points = {(p["n"], p["healed"]): p["rows"] for p in points}

    def run(self, n: int, healed: bool, rows: Callable[[], list[dict]]) -> list[dict]:
        """The rows of point (n, healed): cached, or computed by rows() and recorded."""
        if (n, healed) not in self.points:
            if self.path is None:
                return rows()
            self.points[(n, healed)] = json.loads(json.dumps(rows()))  # exactly what a resumed run reads back
            points = [{"n": n, "healed": h, "rows": r} for (n, h), r in self.points.items()]
            artifacts.write_text(self.path, json.dumps({"settings": self.settings, "points": points}, indent=1) + "\n")
        return self.points[(n, healed)]


def _settings(model, ns, evals, distances, strategy, heal_ns, settings) -> dict:
    """What a cached sweep must share with a rerun to be resumed."""
    digest = hashlib.sha256(distances.matrix.numpy().tobytes()).hexdigest()[:16] if distances is not None else None
    return dict(
        model=getattr(model, "name_or_path", None) or "unknown", num_layers=layers.num_layers(model),
        placement=provenance(model), ns=[int(n) for n in ns], strategy=strategy, distances=digest,
        evals=[getattr(e, "__qualname__", type(e).__name__) for e in evals], heal_ns=sorted(int(n) for n in heal_ns),
        settings=settings,
    )  # fmt: skip


def sweep(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], distances=None,
    strategy: str = "similarity", heal: Callable | None = None, heal_ns: Sequence[int] = (),
    cache_path: str | Path | None = None, settings: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Evaluate `model` with n layers removed for every n in `ns` (0 = the unpruned model).

    Each pruned model is a view of the loaded one (kit.prune.dropped), restored afterwards.
    heal(pruned_model, tokenizer, block) -> healed model is applied to every n in `heal_ns` (it gets
    the pruned view and must not modify it: see healer), and those rows carry healed=True.
    cache_path: a JSON file recording each finished (n, healed) point; a rerun with the same settings
    skips those points and returns the same table. settings: whatever else changes the results (the
    evaluations' parameters, a HealConfig digest), JSON-able; recorded there and compared on resume.
    Returns one row per (n, metric): strategy, n, fraction (n / L), start, distance, healed, metric, value.
    """
    num = layers.num_layers(model)
    blocks = {n: choose_block(num, n, strategy, distances) for n in ns if n != 0}
    if missing := set(heal_ns) - set(blocks):
        raise ValueError(f"heal_ns {sorted(missing)} must be non-zero block sizes that are also in ns")
    if heal_ns and heal is None:
        raise ValueError("heal_ns needs a heal function, e.g. kit.sweep.healer(...)")
    cache = _Cache(cache_path, _settings(model, ns, evals, distances, strategy, heal_ns, settings))
    rows = []
    for n in tqdm(ns, desc=f"sweep ({strategy})", unit="n"):
        block = blocks.get(n)
        columns = dict(
            strategy=strategy, n=n, fraction=n / num,
            start=block.start if block else None, distance=block.distance if block else None,
        )  # fmt: skip
        unhealed = lambda: _rows(evaluate_all(model, tokenizer, evals), **columns, healed=False)  # noqa: E731
        if block is None:
            rows += cache.run(n, False, unhealed)
            continue
        with dropped(model, block):
            rows += cache.run(n, False, unhealed)
            if n in heal_ns:
                rows += cache.run(n, True, lambda: _rows(_healed_metrics(heal, model, tokenizer, block, evals), **columns, healed=True))
    return pd.DataFrame(rows)


def _healed_metrics(heal, model, tokenizer, block, evals) -> dict[str, float]:
    healed = heal(model, tokenizer, block)  # from the pruned view; heal must leave it untouched
    return evaluate_all(healed, tokenizer, evals)


def healer(texts: list[str], config, *, output_root, val_texts=None) -> Callable:
    """A `heal` function for sweep(): kit.heal with `config` on `texts`, adapters under output_root/n{n}.
    The loaded model is never copied for a 4-bit heal; with config.quantize=None the pruned model is."""
    from .healing import heal as heal_model

    def run(pruned, tokenizer, block: Block):
        output_dir = Path(output_root) / f"n{block.n}"
        # a 4-bit heal re-loads the pruned weights quantized; LoRA on the full-precision base needs its own copy
        base = pruned if config.quantize else copy.deepcopy(pruned)
        return heal_model(base, tokenizer, texts, config, output_dir=output_dir, val_texts=val_texts).model

    return run
