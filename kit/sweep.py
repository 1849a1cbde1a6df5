"""Pruning sweeps: evaluate one loaded model with every block size n removed, the way the
paper's Figures 2, 3, 5 and 6 do, without reloading or copying the model."""

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import artifacts, cost, distributed, evaluate, layers, prune
from .block import Block
from .device import provenance
from .prune import dropped
from .stats import Z95, Estimate, paired_difference, wilson

# An evaluation maps (model, tokenizer) to named metrics: floats, or Estimates with their interval,
# e.g. {"mmlu": Estimate(0.41, 0.27, 0.56, outcomes, chance=0.25)}.
Evaluation = Callable[..., dict[str, float | Estimate]]
STRATEGIES = ("similarity", "heuristic")
CHANCE = {"mmlu": 0.25, "mmlu_subjects": 0.25, "boolq": 0.5}  # fixed by the benchmark; recall's rows carry theirs


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
        metrics = {name: estimate.value for name, estimate in evaluate_all(model, tokenizer, evals).items()}
        rows.append({"model": label, "layers": layers.num_layers(model), "parameters": cost.parameters(model), **metrics})
        del model
    return pd.DataFrame(rows).set_index("model")


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy / torch scalars -> Python


def _rows(metrics: dict[str, Estimate], **columns) -> list[dict]:
    columns = {k: _plain(v) for k, v in columns.items()}
    return [
        {**columns, "metric": name, "value": _plain(e.value), "ci_low": _plain(e.low), "ci_high": _plain(e.high),
         "chance": _plain(e.chance), "outcomes": _encode(e.outcomes)}
        for name, e in metrics.items()
    ]  # fmt: skip


class _Cache:
    """The finished points of a sweep in one JSON file, rewritten atomically after each point,
    with the settings that produced them: a rerun with the same settings skips them. Under
    torch.distributed rank 0 reads and writes the file, and every rank skips the points it read."""

    def __init__(self, path, settings: dict):
        self.path, self.settings = path, settings
        self.points = distributed.on_main(self._read)

    def _read(self) -> dict:
        path, settings = self.path, self.settings
        if path is None or not Path(path).exists():
            return {}
        try:
            cached = json.loads(Path(path).read_text())
            old, points = cached["settings"], cached["points"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a sweep cache ({error}); delete it or pass another cache_path") from None
        if old != settings:
            changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            raise ValueError(f"{path} holds a sweep made with other settings ({'; '.join(changed)}); "
                             "delete it or pass another cache_path")  # fmt: skip
        return {(p["n"], p["healed"]): p["rows"] for p in points}

    def run(self, n: int, healed: bool, rows: Callable[[], list[dict]]) -> list[dict]:
        """The rows of point (n, healed): cached, or computed by rows() and recorded."""
        if (n, healed) not in self.points:
            if self.path is None:
                return rows()
            self.points[(n, healed)] = json.loads(json.dumps(rows()))  # exactly what a resumed run reads back
            points = [{"n": n, "healed": h, "rows": r} for (n, h), r in self.points.items()]
            if distributed.is_main():
                artifacts.write_text(self.path, json.dumps({"settings": self.settings, "points": points}, indent=1) + "\n")
        return self.points[(n, healed)]


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _settings(model, ns, evals, distances, oracle, strategy, heal_ns, settings) -> dict:
    """What a cached sweep must share with a rerun to be resumed."""
    return dict(
        model=getattr(model, "name_or_path", None) or "unknown", num_layers=layers.num_layers(model),
        placement=provenance(model), ns=[int(n) for n in ns], strategy=strategy,
        distances=_digest(distances.matrix.numpy()) if distances is not None else None,
        oracle=_digest(np.asarray(oracle.loss)) if oracle is not None else None,
        evals=[getattr(e, "__qualname__", type(e).__name__) for e in evals], heal_ns=sorted(int(n) for n in heal_ns),
        settings=settings,
    )  # fmt: skip


def _encode(outcomes) -> str | None:
    """Per-question outcomes as one letter each, R (right) or W (wrong): compact and CSV-safe."""
    return None if outcomes is None else "".join("R" if right else "W" for right in outcomes)


def outcomes(row) -> np.ndarray:
    """The per-question outcomes (bool) of a sweep row, e.g. results.iloc[0]."""
    if not isinstance(row["outcomes"], str):
        raise ValueError(f"metric {row['metric']!r} has no per-question outcomes (only accuracies over questions do: mmlu, boolq)")
    return np.frombuffer(row["outcomes"].encode(), dtype=np.uint8) == ord("R")


def sweep(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], distances=None,
    strategy: str = "similarity", heal: Callable | None = None, heal_ns: Sequence[int] = (), oracle=None,
    cache_path: str | Path | None = None, settings: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Evaluate `model` with n layers removed for every n in `ns` (0 = the unpruned model).

    strategy: a criterion of kit.prune.CRITERIA; "loss" reads `oracle` (kit.ablation_losses on calibration texts).
    Each pruned model is a view of the loaded one (kit.prune.dropped), restored afterwards.
    heal(pruned_model, tokenizer, block) -> healed model is applied to every n in `heal_ns` (it gets
    the pruned view and must not modify it: see healer), and those rows carry healed=True.
    cache_path: a JSON file recording each finished (n, healed) point; a rerun with the same settings
    skips those points and returns the same table. settings: whatever else changes the results (the
    evaluations' parameters, a HealConfig digest), JSON-able; recorded there and compared on resume.
    Returns one row per (n, metric): strategy, n, fraction (n / L), start, distance, healed, metric,
    value, its 95% interval ci_low, ci_high (NaN where a metric has none), chance (an accuracy's
    chance level, else NaN) and, for accuracies over questions, the outcomes of every question (see `outcomes`).
    """
    num = layers.num_layers(model)
    blocks = {n: prune.choose_block(strategy, num, n, distances=distances, oracle=oracle) for n in ns if n != 0}
    if missing := set(heal_ns) - set(blocks):
        raise ValueError(f"heal_ns {sorted(missing)} must be non-zero block sizes that are also in ns")
    if heal_ns and heal is None:
        raise ValueError("heal_ns needs a heal function, e.g. kit.sweep.healer(...)")
    recorded = _settings(model, ns, evals, distances, oracle, strategy, heal_ns, settings)
    distributed.require_same("the sweep", {**recorded, "placement": None})  # each evaluation checks its own inputs
    cache = _Cache(cache_path, recorded)
    rows = []
    for n in tqdm(ns, desc=f"sweep ({strategy})", unit="n", disable=not distributed.is_main()):
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


def sweeps(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], folder, distances=None,
    strategies: Sequence[str] = STRATEGIES, heal_texts: list[str] | None = None, heal_config=None,
    heal_ns: Sequence[int] = (), settings: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """sweep() once per strategy on the same model, the tables concatenated (a notebook's whole sweep);
    n = 0, the unpruned model whatever the strategy, is evaluated once and shared.

    folder: the run folder: each strategy's finished points are cached in folder/sweep-{strategy}.json,
    and for every n in heal_ns its block is healed with kit.heal (heal_config on heal_texts) into
    folder/sweep_healed/{strategy}/n{n}, evaluated beside its unhealed twin (rows with healed=True).
    settings: what else changes the results (see sweep); the HealConfig's digest is added to it.
    """
    if heal_ns and (heal_texts is None or heal_config is None):
        raise ValueError("healing block sizes (heal_ns) needs heal_texts and heal_config (a kit.HealConfig)")
    settings = {**(settings or {}), "heal": heal_config.digest() if heal_ns else None}
    folder = Path(folder)
    tables: list[pd.DataFrame] = []
    for strategy in strategies:
        shared = tables[0][tables[0]["n"] == 0].assign(strategy=strategy) if tables and 0 in ns else None
        heal = healer(heal_texts, heal_config, output_root=folder / "sweep_healed" / strategy) if heal_ns else None
        table = sweep(model, tokenizer, ns=[n for n in ns if shared is None or n != 0], evals=evals, distances=distances,
                      strategy=strategy, heal=heal, heal_ns=heal_ns, cache_path=folder / f"sweep-{strategy}.json",
                      settings=settings)  # fmt: skip
        tables.append(table if shared is None else pd.concat([shared, table], ignore_index=True))
    return pd.concat(tables, ignore_index=True)


def _healed_metrics(heal, model, tokenizer, block, evals) -> dict[str, Estimate]:
    healed = heal(model, tokenizer, block)  # from the pruned view; heal must leave it untouched
    return evaluate_all(healed, tokenizer, evals)


def paired_comparison(results: pd.DataFrame, by: str, a, b, *, metric: str = "mmlu", resamples: int = 2000,
                      seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """For every n evaluated both ways, `metric` where results[by] == a minus where it is b, on the
    same questions, with a paired bootstrap 95% interval (questions resampled together).

    E.g. paired_comparison(results, "strategy", "similarity", "heuristic") or
    paired_comparison(healed, "healed", True, False). Returns one row per n: n, fraction,
    "{by}={a}", "{by}={b}", difference, ci_low, ci_high.
    """
    rows = results[results["metric"] == metric]
    table = []
    for n, group in rows.groupby("n", sort=True):
        pair = [group[group[by] == label] for label in (a, b)]
        if any(len(side) > 1 for side in pair):
            raise ValueError(f"several {metric!r} rows for n={n} with {by}={a!r} or {b!r}: keep one curve per {by} value")
        if any(side.empty for side in pair):
            continue
        (row_a, row_b) = (side.iloc[0] for side in pair)
        difference = paired_difference(outcomes(row_a), outcomes(row_b), resamples=resamples, seed=seed)
        table.append({"n": n, "fraction": row_a["fraction"], f"{by}={a}": row_a["value"], f"{by}={b}": row_b["value"],
                      "difference": difference.value, "ci_low": difference.low, "ci_high": difference.high})  # fmt: skip
    if not table:
        raise ValueError(f"no n has {metric!r} rows for both {by}={a!r} and {by}={b!r}")
    return pd.DataFrame(table)


def chance_level(results: pd.DataFrame, metric: str) -> float | None:
    """The chance level of `metric` in sweep rows: the one its rows carry (the evaluation knows it, e.g.
    recall's 1 / facts), else CHANCE[metric]; None for metrics without one (losses)."""
    rows = results[results["metric"] == metric]
    levels = rows["chance"].dropna().unique() if "chance" in rows else []
    if len(levels) > 1:
        raise ValueError(f"the rows of {metric!r} carry several chance levels {sorted(levels)}: select rows of one kind")
    return float(levels[0]) if len(levels) else CHANCE.get(metric)


def collapse_point(results: pd.DataFrame, metric: str = "mmlu", chance: float | None = None, *,
                   resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """The paper's central quantity: the smallest fraction of layers dropped at which accuracy is no
    longer distinguishable from chance (its Wilson 95% interval reaches `chance`), with a 95% interval
    from resampling the questions (percentile bootstrap, the same questions at every n).

    results: one sweep curve (one strategy, healed or not). chance: default chance_level(results, metric).
    Returns (fraction, (low, high)); inf where accuracy stays above chance at every fraction swept.
    """
    chance = chance_level(results, metric) if chance is None else chance
    if chance is None:
        raise ValueError(f"no chance level known for {metric!r}: pass chance=")
    rows = results[results["metric"] == metric].sort_values("n")
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r}; metrics present: {sorted(results['metric'].unique())}")
    if rows["n"].duplicated().any():
        raise ValueError("results hold several curves: select one, e.g. results[results.strategy == 'similarity']")
    right = np.stack([outcomes(row) for _, row in rows.iterrows()])  # [points, questions]
    fractions = np.append(rows["fraction"].to_numpy(float), math.inf)

    def first_collapse(hits: np.ndarray) -> np.ndarray:  # hits [..., points] -> fraction per leading index
        low, _ = wilson(hits, right.shape[1])
        collapsed = low <= chance
        return fractions[np.where(collapsed.any(-1), collapsed.argmax(-1), len(fractions) - 1)]

    rng = np.random.default_rng(seed)
    resampled = np.stack([right[:, rng.integers(right.shape[1], size=right.shape[1])].sum(1) for _ in range(resamples)])
    low, high = np.quantile(first_collapse(resampled), [0.025, 0.975], method="inverted_cdf")
    return float(first_collapse(right.sum(1))), (float(low), float(high))


def collapse_points(results: pd.DataFrame, metric: str = "mmlu", chance: float | None = None, **kwargs) -> pd.DataFrame:
    """collapse_point of each strategy's unhealed curve in a sweeps() table: one row per strategy
    with the fraction dropped where `metric` reaches chance and its 95% interval (inf: beyond the sweep)."""
    unhealed = results[~results["healed"].astype(bool)]
    rows = []
    for strategy, curve in unhealed.groupby("strategy", sort=False):
        fraction, (low, high) = collapse_point(curve, metric, chance, **kwargs)
        rows.append({"strategy": strategy, "metric": metric, "collapse": fraction, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def healing_gains(results: pd.DataFrame, metric: str = "mmlu", **kwargs) -> pd.DataFrame:
    """For each strategy with healed rows, healed minus unhealed `metric` on the same questions at
    every healed n, with its paired bootstrap 95% interval (paired_comparison), plus a strategy column."""
    tables = [
        paired_comparison(curve, "healed", True, False, metric=metric, **kwargs).assign(strategy=strategy)
        for strategy, curve in results.groupby("strategy", sort=False)
        if curve["healed"].astype(bool).any()
    ]
    if not tables:
        raise ValueError("no healed rows: sweep with heal_ns (kit.sweep.sweeps(..., heal_ns=[...]))")
    return pd.concat(tables, ignore_index=True)


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
