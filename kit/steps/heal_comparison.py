"""The heal_compare step (notebook 07): every healing method on the same cuts, measured against the cut alone."""

from dataclasses import dataclass

import pandas as pd

from ..core import distributed
from ..core.block import Block
from ..core.config import HealCompareConfig, HealConfig, ScanConfig
from ..core.device import release_memory
from ..evaluate.metrics import ValidationLoss
from ..evaluate.recall_task import recall_items
from ..experiments import heal_compare as comparing
from ..healing.last_layers import LastLayersConfig
from ..healing.linear_patch import LinearPatchConfig
from ..healing.replacement import ReplacementLayerConfig
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run
from ..scan.similarity import angular_distances
from .oracle import model_name


@dataclass
class HealComparison:
    """What the heal_compare step measured (each table also in the run folder)."""

    table: pd.DataFrame  # heal_compare.csv: one row per block size, method and metric, with the method's cost
    refused: dict  # heal_refused.json: the methods that do not apply to a cut, and why
    paired: pd.DataFrame  # heal_paired.csv: each method minus the cut alone, paired 95% intervals
    best: pd.DataFrame  # heal_best.csv: the best method per block size by held-out loss
    blocks: dict[int, Block]  # the cut at each block size
    unpruned: float  # the unpruned model's held-out loss


def methods(config: HealCompareConfig) -> dict:
    """Each method of config.methods with its settings at the comparison's sizes."""
    trained = dict(steps=config.steps, lr=config.lr, seed=config.seed)
    lora = dict(trained, warmup_steps=0, batch_size=4, seq_len=config.max_length, save_every=config.steps, quantize=config.quantize)
    settings = {
        "none": "none",
        "linear_patch": LinearPatchConfig(n_texts=config.n_texts, max_length=config.max_length),
        "replacement_layer": ReplacementLayerConfig(n_texts=config.n_texts, max_length=config.max_length, steps=4 * config.steps,
                                                    lr=config.lr, seed=config.seed),  # fmt: skip
        "last_layers": LastLayersConfig(k=2, warmup_steps=0, batch_size=4, seq_len=config.max_length, **trained),
        "qlora": HealConfig(**lora),
        "distill": HealConfig(**lora, distill_weight=0.5),
    }
    if unknown := set(config.methods) - set(settings):
        raise ValueError(f"HealCompareConfig.methods: no method {', '.join(sorted(unknown))}; choose among {', '.join(settings)}")
    return {name: settings[name] for name in config.methods}


def heal_compare(run: Run, config: HealCompareConfig) -> HealComparison:
    """Scan the model on `config.n_texts` texts, take the similarity block of each size in config.ns, heal each cut
    by every method of config.methods (a fresh copy of the model each time, its checkpoint in heal_compare/n{n}/{method})
    and measure it beside the unpruned model: writes heal_compare.csv, heal_refused.json, heal_paired.csv and
    heal_best.csv."""
    name = model_name(run, config.model_name)
    texts, val_texts = data.corpus("train")[: config.n_texts], data.corpus("validation")[: config.n_val_texts]
    model, tokenizer = load_model(name, device=run.device, dtype=run.dtype)
    distances = angular_distances(model, tokenizer, texts, ScanConfig(n_texts=config.n_texts, max_length=config.max_length))
    blocks = {n: distances.best_block(n) for n in config.ns}
    unpruned = ValidationLoss(tuple(val_texts), max_length=config.max_length)(model, tokenizer)["val_loss"].value
    model = None  # each method heals a fresh copy
    release_memory()
    table, refused = comparing.compare_methods(
        name, blocks, methods(config), texts=texts, val_texts=val_texts, folder=run.file("heal_compare_models"),
        recall_items=recall_items(n=config.recall_items, facts=config.recall_facts, seed=config.seed), max_length=config.max_length,
        device=run.device, dtype=run.dtype,
    )  # fmt: skip
    paired, best = comparing.paired_to_cut(table), comparing.best_methods(table)
    if distributed.is_main():
        run.write_csv("heal_compare", table, index=False)
        run.write_json("heal_refused", refused)
        run.write_csv("heal_paired", paired, index=False)
        run.write_csv("heal_best", best, index=False)
        run.record("heal_compare", config, model=name, unpruned_val_loss=unpruned, blocks={n: [b.start, b.n] for n, b in blocks.items()})
    return HealComparison(table, refused, paired, best, blocks, unpruned)
