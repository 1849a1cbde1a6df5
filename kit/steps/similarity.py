"""The scan step (notebook 01): the layer-similarity scan of a model, on its calibration texts."""

from ..core import distributed, layers
from ..core.config import ScanConfig
from ..core.device import provenance
from ..core.ledger import plan
from ..evaluate.inference_cost import parameters
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run
from ..scan.distances import Distances
from ..scan.similarity import angular_distances


def scan(run: Run, config: ScanConfig) -> Distances:
    """Scan `config.model_name` on `config.n_texts` texts of `config.source`: writes distances.safetensors (of a
    sublayer scan, its layer scan too: what the later steps read), sublayer_distances.safetensors (sublayers=True)
    and choices.csv (the smallest-distance block of every size). Resumes an interrupted scan of the same settings."""
    if config.model_name is None:
        raise ValueError("ScanConfig.model_name is the model to scan: an embedded alias (smollm2-135m), a checkpoint folder or a Hub id")
    model, tokenizer = load_model(config.model_name, **run.load_kwargs(config.quantize))
    texts = data.load_texts(config.source, config.split, config.n_texts)
    plan(model, scan=dict(batch_size=config.batch_size, max_length=config.max_length, metric=config.metric, sublayers=config.sublayers))
    distances = angular_distances(model, tokenizer, texts, config, cache_path=run.file("scan_cache", digest=config.digest()))
    if distributed.is_main():
        whole = distances.layers() if config.sublayers else distances
        whole.save(run.file("distances"))
        if config.sublayers:
            distances.save(run.file("sublayer_distances"))
        run.write_csv("choices", whole.choices(range(1, whole.num_layers)))
        run.record("scan", config, model=config.model_name, n_texts=len(texts), layers=layers.num_layers(model),
                   parameters=parameters(model), placement=provenance(model), world_size=distributed.world_size())  # fmt: skip
    distributed.barrier()
    return distances
