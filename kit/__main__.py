"""`python -m kit scan | sweep | heal`: the pipeline's long steps from the command line, for launchers.

    torchrun --nproc_per_node 8 -m kit scan --model meta-llama/Llama-2-70b-hf --out runs/70b --n-texts 10000
    torchrun --nproc_per_node 8 -m kit sweep --model meta-llama/Llama-2-70b-hf --out runs/70b --ns 0 8 16 24 32
    accelerate launch --num_processes 8 -m kit heal --model runs/70b/pruned --out runs/70b --rank 8 --lr 3e-5

Under a launcher the texts, questions and healing batches are split over the processes
(kit.core.distributed) and every process gets the one-process result; without one it is one process.
The settings are the fields of kit.core.config.ScanConfig / HealConfig as options (--n-texts, --grad-accum,
...); the artifacts are the notebooks' (distances.safetensors, sweep-{criterion}.csv, healed/adapter,
heal_history.json, manifest.json in the run folder --out; a sublayer scan, --sublayers, writes its layer scan as
distances.safetensors and itself as sublayer_distances.safetensors), written by rank 0 alone.
"""

import argparse
import dataclasses
import typing
from pathlib import Path

from .choose import criteria
from .core import artifacts, distributed
from .core.config import HealConfig, ScanConfig
from .core.device import provenance
from .evaluate import metrics
from .experiments import sweep
from .loaders import data, models


def _parse(kind):
    """A parser for a config field annotated `kind` (int, float, str, X | None, str | tuple[str, ...])."""
    kinds = typing.get_args(kind) or (kind,)

    def parse(text: str):
        if type(None) in kinds and text.lower() == "none":
            return None
        if "," in text and any(typing.get_origin(k) is tuple for k in kinds):
            return tuple(text.split(","))
        for k in (int, float, str):
            if k in kinds:
                try:
                    return k(text)
                except ValueError:
                    continue
        raise argparse.ArgumentTypeError(f"{text!r} is not a {' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}")

    return parse


def _add_config(parser: argparse.ArgumentParser, config_class, skip=()):
    """One option per field of a settings dataclass, with its default."""
    group = parser.add_argument_group(f"{config_class.__name__} (kit.core.config)")
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            group.add_argument(flag, type=_parse(field.type), default=field.default, help=f"default: {field.default}")


def _config(config_class, args, **fixed):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if f.name not in fixed}, **fixed)


def _load(args, quantize):
    device_map = args.device_map if args.device_map != "none" else None
    return models.load_model(args.model, device=args.device, dtype=args.dtype, quantize=quantize, device_map=device_map,
                             offload_folder=args.offload_folder)  # fmt: skip


def _record(out: Path, step: str, config, model, **extra):
    """The run's manifest entry (rank 0), with the number of processes."""
    if distributed.is_main():
        artifacts.write_manifest(out, step, config=config, seed=getattr(config, "seed", None), placement=provenance(model),
                                 world_size=distributed.world_size(), **extra)  # fmt: skip


def scan(args):
    from .scan.similarity import angular_distances

    config = _config(ScanConfig, args, model_name=args.model)
    model, tokenizer = _load(args, args.quantize)
    texts = data.load_texts(config.source, config.split, config.n_texts)
    distances = angular_distances(model, tokenizer, texts, config, cache_path=args.out / f"scan-{config.digest()}.safetensors")
    if distributed.is_main():
        distances.layers().save(args.out / "distances.safetensors")  # of a sublayer scan, its layer scan: what sweeps read
        if config.sublayers:
            distances.save(args.out / "sublayer_distances.safetensors")
    _record(args.out, "scan", config, model, n_texts=len(texts))
    return distances


def run_sweep(args):
    from .scan.distances import Distances

    model, tokenizer = _load(args, args.quantize)
    subjects = data.mmlu_subjects()[: args.mmlu_subjects]
    evals = [
        metrics.MMLUAccuracy(data.mmlu_questions(subjects, per_subject=args.per_subject), shots=args.shots, batch_size=args.batch_size),
        metrics.ValidationLoss(data.load_texts(args.val_source, "validation", args.val_texts), max_length=args.max_length,
                           batch_size=args.batch_size),
    ]  # fmt: skip
    if args.boolq is not None:
        evals.append(metrics.BoolQAccuracy(data.boolq_items(args.boolq, n=args.n_boolq), batch_size=args.batch_size))
    needs_scan = args.criterion in criteria.CRITERIA and criteria.CRITERIA[args.criterion].needs == "distances"
    distances = Distances.load(artifacts.require(args.out / "distances.safetensors")) if needs_scan else None
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "out", "func")}
    results = sweep.sweep(model, tokenizer, ns=args.ns, evals=evals, distances=distances, criterion=args.criterion,
                          cache_path=args.out / f"sweep-{args.criterion}.json", settings=settings)  # fmt: skip
    if distributed.is_main():
        artifacts.write_text(args.out / f"sweep-{args.criterion}.csv", results.to_csv(index=False))
    _record(args.out, f"sweep-{args.criterion}", settings, model)
    return results


def heal(args):
    from .healing.train import heal as heal_model

    config = _config(HealConfig, args)
    model, tokenizer = _load(args, config.quantize)
    texts = data.load_texts(args.source, "train", args.n_train_texts)
    val_texts = data.load_texts(args.source, "validation", args.n_val_texts) if args.n_val_texts else None
    result = heal_model(model, tokenizer, texts, config, output_dir=args.out / "healed", val_texts=val_texts)
    if distributed.is_main():
        artifacts.write_json(args.out / "heal_history.json", result.history)
    _record(args.out, "heal", config, model, source=args.source, n_train_texts=len(texts), global_batch=result.history["global_batch"])
    return result


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    helps = {"scan": "layer-similarity scan -> OUT/distances.safetensors (--sublayers: also OUT/sublayer_distances.safetensors)",
             "sweep": "MMLU / loss (/ BoolQ) with n layers removed, for each n -> OUT/sweep-CRITERION.csv",
             "heal": "LoRA / QLoRA healing -> OUT/healed/adapter, OUT/heal_history.json"}  # fmt: skip
    subs = {}
    for name, func in (("scan", scan), ("sweep", run_sweep), ("heal", heal)):
        sub = subs[name] = commands.add_parser(name, help=helps[name], description=helps[name])
        sub.set_defaults(func=func)
        sub.add_argument("--model", required=True, help="embedded alias, checkpoint folder, .gguf file or Hub id")
        sub.add_argument("--out", type=Path, required=True, help="the run folder (as the notebooks' RUNS_ROOT/RUN)")
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 (auto under a launcher: this process's GPU)")
        sub.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
        sub.add_argument("--device-map", default="none", help="accelerate's dispatch of a model too big for one device, e.g. auto")
        sub.add_argument("--offload-folder", default=None, help="where --device-map offloads weights to disk")
        if name != "heal":
            sub.add_argument("--quantize", type=_parse(str | None), default="auto", help="auto | 4bit | none")
    _add_config(subs["scan"], ScanConfig, skip=("model_name",))
    sw = subs["sweep"]
    sw.add_argument("--ns", type=int, nargs="+", required=True, help="block sizes to remove (0: the unpruned model)")
    sw.add_argument("--criterion", default="similarity", help=f"a name in kit.choose.criteria.CRITERIA, e.g. {', '.join(sweep.PAPER_CRITERIA)}")
    sw.add_argument("--mmlu-subjects", type=int, default=57, help="the first K subjects in alphabetical order")
    sw.add_argument("--per-subject", type=int, default=None, help="questions per subject (default: all)")
    sw.add_argument("--shots", type=int, default=5)
    sw.add_argument("--val-source", default="corpus", help="validation texts for the loss: corpus | c4 | a datasets name")
    sw.add_argument("--val-texts", type=int, default=16)
    sw.add_argument("--max-length", type=int, default=512)
    sw.add_argument("--batch-size", type=int, default=8)
    sw.add_argument("--boolq", default=None, help="hub or a local .jsonl (default: no BoolQ)")
    sw.add_argument("--n-boolq", type=int, default=500)
    hl = subs["heal"]
    _add_config(hl, HealConfig)
    hl.add_argument("--source", default="corpus", help="healing texts: corpus | c4 | a datasets name")
    hl.add_argument("--n-train-texts", type=int, default=1000)
    hl.add_argument("--n-val-texts", type=int, default=16)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    distributed.init()
    if distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return args.func(args)


if __name__ == "__main__":
    main()
