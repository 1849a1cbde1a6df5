"""The prune step (notebook 02): choose the block, remove it, save the pruned checkpoint, measure the loss."""

from dataclasses import dataclass

from ..choose.criteria import Selection, choose_block
from ..core import layers
from ..core.block import Block
from ..core.config import PruneConfig
from ..core.device import provenance
from ..core.ledger import plan
from ..evaluate.inference_cost import parameters
from ..evaluate.loss import LossResult, validation_loss
from ..healing.merge import save_pruned_full_precision
from ..loaders import data
from ..loaders.models import load_model, resolve
from ..prune import drop_layers, mergekit_config, save_pruned
from ..run import Run
from ..scan.distances import Distances


@dataclass
class Pruned:
    """What the prune step did: the block it removed and the validation loss before and after."""

    selection: Selection
    original: LossResult
    pruned: LossResult


def select(distances: Distances, config: PruneConfig) -> Selection:
    """The block `config` asks for: `config.start` if set ("manual" unless it is the criterion's block), else the
    block `config.criterion` picks for `config.n`; with its distance in the scan."""
    chosen = choose_block(config.criterion, distances.num_layers, config.n, distances=distances)
    start = chosen.start if config.start is None else Block(config.start, config.n).check(distances.num_layers).start
    source = config.criterion if start == chosen.start else "manual"
    distance = float(distances.matrix[start, start + config.n])
    return Selection(start, config.n, distance, source, distances.meta.get("model"))


def prune(run: Run, config: PruneConfig) -> Pruned:
    """Remove the block `config` chooses from the scanned model: writes selection.json, pruned/ (a plain checkpoint;
    a model loaded in 4-bit is written in full precision), mergekit.yaml and losses.json (the validation loss
    before and after, per text)."""
    selection = select(Distances.load(run.require("distances")), config)
    selection.save(run.file("selection"))
    model, tokenizer = load_model(selection.model, **run.load_kwargs(config.quantize))
    plan(model, loss=dict(batch_size=config.batch_size, max_length=config.max_length))
    texts = data.corpus("validation")[: config.n_val_texts]
    size = dict(layers=layers.num_layers(model), parameters=parameters(model))  # before pruning in place
    measure = lambda m: validation_loss(m, tokenizer, texts, max_length=config.max_length, batch_size=config.batch_size)  # noqa: E731
    original = measure(model)
    pruned = drop_layers(model, selection.block, inplace=True)
    if getattr(pruned, "is_loaded_in_4bit", False):
        save_pruned_full_precision(pruned, tokenizer, run.file("pruned"))
    else:
        save_pruned(pruned, tokenizer, run.file("pruned"))
    run.write_text("mergekit", mergekit_config(resolve(selection.model), selection.block, size["layers"]))
    after = measure(pruned)
    run.write_json("losses", {"original": vars(original), "pruned": vars(after), "block": selection.to_dict()})
    run.record("prune", config, block=selection.to_dict(), **size, placement=provenance(pruned))
    return Pruned(selection, original, after)
