"""Pruning sweeps: evaluate one loaded model with every block size n removed, the way the
paper's Figures 2, 3, 5 and 6 do, without reloading or copying the model."""

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

from ..choose.criteria import choose_block
from ..core import artifacts, distributed, layers
from ..core.block import Block
from ..core.device import provenance, release_memory
from ..core.memory import live_tensor_bytes
from ..core.progress import progress
from ..core.stats import Estimate
from ..evaluate import inference_cost
from ..evaluate.metrics import Evaluation, evaluate_all
from ..prune import dropped
from . import results

PAPER_CRITERIA = ("similarity", "heuristic")  # the paper's two criteria, the ones sweeps() compares by default


def _load(name, **load_kwargs):
    """A checkpoint with kit.load_model; a (base, adapter) pair gets its LoRA adapter unmerged."""
    from ..loaders.models import load_model

    if not isinstance(name, tuple):
        return load_model(str(name), **load_kwargs)
    from peft import PeftModel

    from ..healing.lora import native_targets

    base, adapter = name
    model, tokenizer = load_model(str(base), **load_kwargs)
    with native_targets():
        return PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer


def compare(checkpoints: dict, evals: Sequence[Evaluation], **load_kwargs) -> pd.DataFrame:
    """One row per labelled checkpoint (loaded one at a time with kit.load_model): layers,
    parameters and every metric of `evals`, e.g. {"original": "smollm2-135m", "pruned": "runs/x/pruned",
    "healed (adapter)": ("runs/x/pruned", "runs/x/healed/adapter")}; a (base, adapter) pair is
    evaluated with the adapter unmerged. kit.evaluate.metrics.InferenceCost() among `evals` puts the inference cost beside the quality.
    A metric with a 95% interval has its bounds beside it (columns "{metric}_ci_low", "{metric}_ci_high")."""
    rows, held = [], live_tensor_bytes()
    for label, name in checkpoints.items():
        model, tokenizer = _load(name, **load_kwargs)
        if not rows and held > (weights := inference_cost.weight_bytes(model)) / 4:
            warnings.warn(f"{held / 2**30:.2f} GiB of tensors are still referenced while compare loads {label!r} "
                          f"({weights / 2**30:.2f} GiB): a model of an earlier step? Drop it first (del model; "
                          "kit.core.device.release_memory()), or both take memory", stacklevel=2)  # fmt: skip
        rows.append({"model": label, "layers": layers.num_layers(model), "parameters": inference_cost.parameters(model),
                     **results.wide(evaluate_all(model, tokenizer, evals))})
        del model
        release_memory()  # before the next checkpoint loads
    return pd.DataFrame(rows).set_index("model")


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
        if changed := _changes(_renamed_settings(old), settings):
            raise ValueError(f"{path} holds a sweep made with other settings ({'; '.join(changed)}); "
                             "delete it or pass another cache_path")  # fmt: skip
        return {(p["n"], p["healed"]): results.renamed(p["rows"]) for p in points}

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


def _renamed_settings(settings):
    """Settings an older cache recorded, under today's names ("strategy" is "criterion", also among the CLI's options)."""
    if not isinstance(settings, dict):
        return settings
    return {results.RENAMED.get(key, key): _renamed_settings(value) for key, value in settings.items()}


def _changes(old, new, where: str = "") -> list[str]:
    """Every setting that differs, named by its path, e.g. ["evals.mmlu.shots: 5 -> 1"]."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in {**old, **new} for change in _changes(old.get(key), new.get(key), f"{where}.{key}".lstrip("."))]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _evaluations(evals) -> dict[str, dict]:
    """Each evaluation's settings by name: every parameter and the identity of its data."""
    recorded = {}
    for i, e in enumerate(evals):
        if isinstance(e, Evaluation):
            name, settings = e.name, e.settings()
        else:  # a plain function, by position: its parameters cannot be seen (None)
            name, settings = f"{i}: {getattr(e, '__qualname__', type(e).__name__)}", None
        if name in recorded:
            raise ValueError(f"two evaluations named {name!r}: evaluate each kind once per sweep")
        recorded[name] = settings
    return recorded


def _settings(model, ns, evals, distances, oracle, criterion, heal_ns, settings) -> dict:
    """What a cached sweep must share with a rerun to be resumed."""
    return dict(
        model=getattr(model, "name_or_path", None) or "unknown", num_layers=layers.num_layers(model),
        placement=provenance(model), ns=[int(n) for n in ns], criterion=criterion,
        distances=_digest(distances.matrix.numpy()) if distances is not None else None,
        oracle=_digest(np.asarray(oracle.loss)) if oracle is not None else None,
        evals=_evaluations(evals), heal_ns=sorted(int(n) for n in heal_ns), settings=settings,
    )  # fmt: skip


def sweep(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], distances=None,
    criterion: str = "similarity", heal: Callable | None = None, heal_ns: Sequence[int] = (), oracle=None,
    cache_path: str | Path | None = None, settings: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Evaluate `model` with n layers removed for every n in `ns` (0 = the unpruned model).

    criterion: a name in kit.choose.criteria.CRITERIA; "loss" reads `oracle` (kit.choose.oracle.ablation_losses on
    calibration texts).
    Each pruned model is a view of the loaded one (kit.prune.dropped), restored afterwards.
    heal(pruned_model, tokenizer, block) -> healed model is applied to every n in `heal_ns` (it gets
    the pruned view and must not modify it: see healer), and those rows carry healed=True; a heal with
    `takes_original = True` (healer's for a healing method) gets the unpruned model instead, and must not modify it either.
    cache_path: a JSON file recording each finished (n, healed) point; a rerun with the same settings
    (the evaluations' parameters and data included) skips those points and returns the same table; one
    with other settings is refused, naming them. settings: whatever else changes the results (e.g. a
    HealConfig digest), JSON-able; recorded there and compared on resume.
    Returns one row per (n, metric): criterion, n, fraction (n / L), start, distance, healed, metric,
    value, its 95% interval ci_low, ci_high (NaN where a metric has none), chance (an accuracy's
    chance level, else NaN) and, for accuracies over questions, the outcomes of every question
    (kit.experiments.results.outcomes reads them; kit.experiments.curves reads the whole table). Columns: kit.experiments.results.COLUMNS.
    """
    num = layers.num_layers(model)
    blocks = {n: choose_block(criterion, num, n, distances=distances, oracle=oracle) for n in ns if n != 0}
    if missing := set(heal_ns) - set(blocks):
        raise ValueError(f"heal_ns {sorted(missing)} must be non-zero block sizes that are also in ns")
    if heal_ns and heal is None:
        raise ValueError("heal_ns needs a heal function, e.g. kit.experiments.sweep.healer(...)")
    recorded = _settings(model, ns, evals, distances, oracle, criterion, heal_ns, settings)
    distributed.require_same("the sweep", {**recorded, "placement": None})  # each evaluation checks its own inputs
    if cache_path is not None and (plain := [name for name, seen in recorded["evals"].items() if seen is None]):
        warnings.warn(f"evaluations {plain} are plain functions: a resumed sweep cannot see their parameters and may return "
                      "stale rows; make each a kit.evaluate.metrics.Evaluation (a frozen dataclass)", FutureWarning, stacklevel=2)  # fmt: skip
    cache = _Cache(cache_path, recorded)
    rows = []
    for n in progress(ns, desc=f"sweep ({criterion})", unit="n", show=distributed.is_main()):
        block = blocks.get(n)
        columns = dict(
            criterion=criterion, n=n, fraction=n / num,
            start=block.start if block else None, distance=block.distance if block else None,
        )  # fmt: skip
        unhealed = lambda: results.rows(evaluate_all(model, tokenizer, evals), **columns, healed=False)  # noqa: E731
        if block is None:
            rows += cache.run(n, False, unhealed)
            continue
        healed = lambda: results.rows(_healed_metrics(heal, model, tokenizer, block, evals), **columns, healed=True)  # noqa: E731
        original = getattr(heal, "takes_original", False)  # a healing method: it cuts the block from the original itself
        with dropped(model, block):
            rows += cache.run(n, False, unhealed)
            if n in heal_ns and not original:
                rows += cache.run(n, True, healed)
        if n in heal_ns and original:
            rows += cache.run(n, True, healed)
    return pd.DataFrame(rows)


def sweeps(
    model, tokenizer, *, ns: Sequence[int], evals: Sequence[Evaluation], folder, distances=None,
    criteria: Sequence[str] = PAPER_CRITERIA, heal_texts: list[str] | None = None, heal_config=None,
    heal_ns: Sequence[int] = (), settings: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """sweep() once per criterion on the same model, the tables concatenated (a notebook's whole sweep);
    n = 0, the unpruned model whatever the criterion, is evaluated once and shared.

    folder: the run folder: each criterion's finished points are cached in folder/sweep-{criterion}.json,
    and for every n in heal_ns its block is healed by heal_config (a kit.HealConfig: kit.heal; or any healing
    method, by name or settings: see healer) on heal_texts into
    folder/sweep_healed/{criterion}/n{n}, evaluated beside its unhealed twin (rows with healed=True).
    settings: what else changes the results (see sweep); the HealConfig's digest is added to it.
    """
    if heal_ns and (heal_texts is None or heal_config is None):
        raise ValueError("healing block sizes (heal_ns) needs heal_texts and heal_config (a kit.HealConfig, or a healing method's name or settings)")
    digest = (heal_config if isinstance(heal_config, str) else heal_config.digest()) if heal_ns else None  # a name: itself
    settings = {**(settings or {}), "heal": digest}
    folder = Path(folder)
    tables: list[pd.DataFrame] = []
    for criterion in criteria:
        shared = tables[0][tables[0]["n"] == 0].assign(criterion=criterion) if tables and 0 in ns else None
        heal = healer(heal_texts, heal_config, output_root=folder / "sweep_healed" / criterion) if heal_ns else None
        table = sweep(model, tokenizer, ns=[n for n in ns if shared is None or n != 0], evals=evals, distances=distances,
                      criterion=criterion, heal=heal, heal_ns=heal_ns, cache_path=folder / f"sweep-{criterion}.json",
                      settings=settings)  # fmt: skip
        tables.append(table if shared is None else pd.concat([shared, table], ignore_index=True))
    return pd.concat(tables, ignore_index=True)


def _healed_metrics(heal, model, tokenizer, block, evals) -> dict[str, Estimate]:
    """The metrics of heal(model, tokenizer, block): a healed model, or a context manager giving one and
    putting the view back after (kit's healer); either way it is freed before the sweep goes on."""
    healed = heal(model, tokenizer, block)  # from the pruned view; heal must leave it untouched
    with healed if isinstance(healed, AbstractContextManager) else nullcontext(healed) as healed:
        metrics = evaluate_all(healed, tokenizer, evals)
    del healed
    release_memory()
    return metrics


def healer(texts: list[str], config, *, output_root, val_texts=None) -> Callable:
    """A `heal` function for sweep(): the healing method `config` (a name in kit.healing.methods.HEALERS or
    a method's settings, e.g. "linear_patch" or kit.LinearPatchConfig(...)) on `texts`, under output_root/n{n}.

    A HealConfig without distillation (QLoRA, the paper's) never copies the loaded model: with config.quantize=None
    the adapters go on the pruned view itself and are taken off again after its evaluation
    (kit.healing.lora.adapted_in_place); a 4-bit heal trains on a 4-bit copy of the pruned weights (one more
    model of a quarter of the fp16 bytes), freed after. Any other method heals a copy of the unpruned model
    (kit.healing.methods.heal_cut cuts it in place; one more copy of the weights, freed after the point's
    evaluation) and writes its plain checkpoint to output_root/n{n}."""
    from ..core.config import HealConfig
    from ..healing.lora import adapted_in_place, reloaded
    from ..healing.methods import heal_cut, resolve
    from ..healing.train import heal as heal_model

    if not (isinstance(config, HealConfig) and config.distill_weight == 0):
        method = resolve(config)[1] or config  # "none" has no settings

        def cut_and_heal(original, tokenizer, block: Block):
            out_dir = Path(output_root) / f"n{block.n}"
            return heal_cut(method, copy.deepcopy(original), tokenizer, block, texts, out_dir=out_dir, val_texts=val_texts).model

        cut_and_heal.takes_original = True
        return cut_and_heal

    @contextmanager
    def run(pruned, tokenizer, block: Block):
        output_dir = Path(output_root) / f"n{block.n}"
        train = lambda base: heal_model(base, tokenizer, texts, config, output_dir=output_dir, val_texts=val_texts).model  # noqa: E731
        if config.quantize is None and not getattr(pruned, "is_loaded_in_4bit", False):
            with adapted_in_place(pruned, train) as healed:
                yield healed
            return
        # a 4-bit model is copied through a checkpoint (peft would cast its norms and inject LoRA in place);
        # a full-precision one is loaded quantized by heal itself
        yield train(reloaded(pruned, tokenizer, "4bit", output_dir) if getattr(pruned, "is_loaded_in_4bit", False) else pruned)

    return run
