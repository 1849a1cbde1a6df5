"""The criteria step (notebook 05): block choices of each scan metric judged by the ablation oracle, the true
held-out loss of removing every block."""

from ..choose.oracle import ablation_losses, compare_criteria
from ..core import layers
from ..core.config import CriteriaConfig
from ..core.device import provenance
from ..core.ledger import plan
from ..evaluate.inference_cost import parameters
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run
from ..scan.distances import Distances
from ..scan.similarity import angular_distances


def model_name(run: Run, name: str | None) -> str:
    """`name`, or (None) the model of the run's scan."""
    return name if name is not None else Distances.load(run.require("distances")).meta["model"]


def criteria(run: Run, config: CriteriaConfig):
    """Scan the model on calibration texts once per metric of `config.metrics`, measure the ablation oracle on the
    calibration and held-out texts, and judge every criterion by its regret on the held-out texts: writes
    distances_{metric}.safetensors, oracle_{split}.safetensors and criteria.csv (regret and rank correlation per
    criterion and block size)."""
    name = model_name(run, config.model_name)
    model, tokenizer = load_model(name, **run.load_kwargs(config.quantize))
    settings = dict(max_length=config.max_length, batch_size=config.batch_size)
    texts = {"calibration": data.load_texts(config.source, "train", config.n_calibration),
             "held_out": data.load_texts(config.source, "validation", config.n_held_out)}  # fmt: skip
    plan(model, scan=dict(settings, metric="angular_all"), oracle=settings)
    scans = [angular_distances(model, tokenizer, texts["calibration"], metric=metric, model_name=name, **settings) for metric in config.metrics]
    for scanned in scans:
        scanned.save(run.file("metric_distances", metric=scanned.meta["metric"]))
    ns = list(config.ns) if config.ns is not None else None
    oracles = {split: ablation_losses(model, tokenizer, split_texts, ns=ns, model_name=name, **settings) for split, split_texts in texts.items()}
    for split, oracle in oracles.items():
        oracle.save(run.file("oracle", split=split))
    table = compare_criteria(oracles["held_out"], distances=scans, calibration=oracles["calibration"])
    run.write_csv("criteria", table, index=False)
    run.record("criteria", config, model=name, layers=layers.num_layers(model), parameters=parameters(model), placement=provenance(model))
    return table
