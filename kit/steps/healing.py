"""The heal step (notebook 03): heal the pruned model, merge it into a plain checkpoint, compare the losses."""

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
from ..healing.train import heal as heal_model
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run

LOSS_BATCH_SIZE = 8  # texts per forward pass of the loss comparison


@dataclass
class Healing:
    """What the heal step did: the training history, the merged checkpoint, and the validation loss of the original,
    pruned and healed models on the same texts (one row each)."""

    history: dict
    merged: Path
    losses: pd.DataFrame


def heal(run: Run, config: HealConfig) -> Healing:
    """Heal the run's pruned model with LoRA adapters (QLoRA on a 4-bit base when config.quantize is "4bit", the
    paper's; distilled from the unpruned model when config.distill_weight > 0) on `config.n_train_texts` texts of
    `config.source`: writes healed/ (the Trainer's checkpoints, resumed when interrupted, and healed/adapter),
    heal_history.json, healed_merged/ (a plain checkpoint) and heal_losses.json."""
    pruned = run.require("pruned")
    selection = Selection.load(run.require("selection"))
    texts = data.load_texts(config.source, "train", config.n_train_texts)
    val_texts = data.load_texts(config.source, "validation", config.n_val_texts)
    placement = dict(device=run.device, dtype=run.dtype)
    model, tokenizer = load_model(str(pruned), **placement, quantize=config.quantize)
    teacher = load_model(selection.model, **placement, quantize=config.quantize)[0] if config.distill_weight > 0 else None
    plan(model, heal=dict(batch_size=config.batch_size, seq_len=config.seq_len, rank=config.rank, checkpointing=config.gradient_checkpointing))
    result = heal_model(model, tokenizer, texts, config, output_dir=run.file("healed"), val_texts=val_texts, teacher=teacher)
    if distributed.is_main():
        run.write_json("heal_history", result.history)
        run.record("heal", config, source=config.source, n_train_texts=len(texts), global_batch=result.history["global_batch"],
                   placement=provenance(model))  # fmt: skip
    history, adapter = result.history, result.adapter_path
    model = teacher = result = None  # the healed model, freed before the comparison loads three others
    release_memory()
    if distributed.is_main():
        merge_adapter(pruned, adapter, run.file("healed_merged"))
    distributed.barrier()
    checkpoints = {"original": selection.model, "pruned": pruned, "healed": run.file("healed_merged")}
    losses = compare(checkpoints, [ValidationLoss(val_texts, max_length=config.seq_len, batch_size=LOSS_BATCH_SIZE)], **placement)
    if distributed.is_main():
        run.write_json("heal_losses", losses.to_dict(orient="index"))
    return Healing(history, run.file("healed_merged"), losses)
