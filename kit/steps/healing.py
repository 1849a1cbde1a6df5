"""The heal step (notebook 03; notebook 07 compares the methods): heal the pruned model into a plain checkpoint and
compare the losses."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..choose.criteria import Selection
from ..core import distributed
from ..core.config import HealConfig
from ..core.device import provenance, release_memory
from ..core.ledger import plan
from ..evaluate.metrics import ValidationLoss
from ..experiments.sweep import compare
from ..healing.merge import merge_adapter
from ..healing.methods import heal_cut, resolve
from ..healing.train import heal as heal_model
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run

LOSS_BATCH_SIZE = 8  # texts per forward pass of the loss comparison
VAL_TEXTS = 16  # validation texts of the loss comparison after a method that takes no validation texts


@dataclass
class Healing:
    """What the heal step did: the method, its history (LoRA's training and validation losses; other methods: their
    cost and record), the healed plain checkpoint, and the validation loss of the original, pruned and healed models
    on the same texts (one row each)."""

    method: str
    history: dict
    merged: Path
    losses: pd.DataFrame


def heal(run: Run, config) -> Healing:
    """Heal the run's cut by the method `config` names: a HealConfig is the paper's QLoRA (LoRA on a 4-bit base
    when config.quantize is "4bit"; distilled from the unpruned model when config.distill_weight > 0), or any
    method of kit.healing.methods.HEALERS by its settings (kit.LinearPatchConfig, kit.ReplacementLayerConfig,
    kit.LastLayersConfig) or its name ("none"). Writes healed_merged/ (a plain checkpoint), heal_history.json and
    heal_losses.json; LoRA also healed/ (the Trainer's checkpoints, resumed when interrupted, and healed/adapter)."""
    method, config = resolve(config)
    selection = Selection.load(run.require("selection"))
    if isinstance(config, HealConfig):
        history, val_texts = _lora(run, config, selection)
    else:
        history, val_texts = _method(run, method, config, selection)
    release_memory()
    distributed.barrier()
    checkpoints = {"original": selection.model, "pruned": run.require("pruned"), "healed": run.file("healed_merged")}
    losses = compare(checkpoints, [ValidationLoss(val_texts, max_length=_max_length(config), batch_size=LOSS_BATCH_SIZE)],
                     device=run.device, dtype=run.dtype)  # fmt: skip
    if distributed.is_main():
        run.write_json("heal_losses", losses.to_dict(orient="index"))
    return Healing(method, history, run.file("healed_merged"), losses)


def _max_length(config) -> int:
    return getattr(config, "seq_len", None) or getattr(config, "max_length", None) or 128


def _lora(run: Run, config: HealConfig, selection: Selection) -> tuple[dict, list[str]]:
    """kit.heal on the run's pruned/ (the teacher, when distilling, the original), merged into healed_merged/."""
    pruned = run.require("pruned")
    texts = data.load_texts(config.source, "train", config.n_train_texts)
    val_texts = data.load_texts(config.source, "validation", config.n_val_texts)
    placement = dict(device=run.device, dtype=run.dtype)
    model, tokenizer = load_model(str(pruned), **placement, quantize=config.quantize)
    teacher = load_model(selection.model, **placement, quantize=config.quantize)[0] if config.distill_weight > 0 else None
    plan(model, heal=dict(batch_size=config.batch_size, seq_len=config.seq_len, rank=config.rank, checkpointing=config.gradient_checkpointing))
    result = heal_model(model, tokenizer, texts, config, output_dir=run.file("healed"), val_texts=val_texts, teacher=teacher)
    history, adapter = result.history, result.adapter_path
    if distributed.is_main():
        run.write_json("heal_history", history | {"method": "distill" if teacher is not None else "qlora"})
        run.record("heal", config, method=history.get("method"), source=config.source, n_train_texts=len(texts),
                   global_batch=history["global_batch"], placement=provenance(model))  # fmt: skip
    model = teacher = result = None  # the healed model, freed before the merge and the comparison
    release_memory()
    if distributed.is_main():
        merge_adapter(pruned, adapter, run.file("healed_merged"))
    return history, val_texts


def _method(run: Run, method: str, config, selection: Selection) -> tuple[dict, list[str]]:
    """heal_cut on the original model (cut in place), into healed_merged/."""
    texts = data.load_texts(getattr(config, "source", "corpus"), "train", getattr(config, "n_texts", None))
    val_texts = data.load_texts(getattr(config, "source", "corpus"), "validation", VAL_TEXTS)
    model, tokenizer = load_model(selection.model, device=run.device, dtype=run.dtype, quantize=None)
    healed = heal_cut(config or method, model, tokenizer, selection.block, texts, out_dir=run.file("healed_merged"), val_texts=val_texts)
    history = {"method": method, "cost": healed.cost, "record": healed.record}
    run.write_json("heal_history", history)
    run.record("heal", config, method=method, n_train_texts=len(texts), cost=healed.cost, placement=provenance(healed.model))
    return history, val_texts
