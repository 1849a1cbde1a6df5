"""Merging a LoRA adapter into its base, streamed shard by shard: a plain checkpoint that loads
without peft, in the memory of one shard."""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.artifacts import atomic_dir, read_json, write_json
from ..core.layers import anatomy, decoder_layers
from ..core.progress import progress
from ..loaders.models import resolve
from ..prune import pruned_before
from ..prune.sublayers import RemovedSublayer


def _checkpoint_folder(base) -> Path:
    """The local folder of a checkpoint: an alias's or a folder as is; a Hub id's downloaded files."""
    source = Path(resolve(str(base)))
    if source.is_dir():
        return source
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(base), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


@dataclass(frozen=True)
class _LoraFactors:
    """One adapted weight's low-rank update: scale * B @ A (transposed for fan-in-fan-out layers)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        delta = (self.b.float() @ self.a.float()) * self.scale
        return (delta.T if self.transpose else delta).to(dtype)


def _lora_factors(adapter_path: Path) -> dict[str, _LoraFactors]:
    """{base weight name: its low-rank update} of a saved LoRA adapter (factors only: small)."""
    from peft import LoraConfig

    lora = LoraConfig.from_pretrained(str(adapter_path))
    if lora.rank_pattern or lora.alpha_pattern or lora.use_dora:
        raise ValueError(f"{adapter_path}: streamed merging supports plain LoRA (no rank/alpha patterns, no DoRA)")
    weights = load_file(Path(adapter_path) / "adapter_model.safetensors")
    factors = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            scale = lora.lora_alpha / (math.sqrt(a.shape[0]) if lora.use_rslora else a.shape[0])
            factors[f"{module}.weight"] = _LoraFactors(a, weights[key.replace(".lora_A.", ".lora_B.")], scale, lora.fan_in_fan_out)
    if not factors:
        raise ValueError(f"{adapter_path} holds no LoRA weights (adapter_model.safetensors has no lora_A tensors)")
    return factors


def _fused_experts(adapter_path: Path) -> bool:
    """Whether the adapter adapts fused expert weights (peft's target_parameters, kit's LoRA on MoE)."""
    from peft import LoraConfig

    return bool(LoraConfig.from_pretrained(str(adapter_path)).target_parameters)


def _merged_by_peft(source: Path, adapter_path: Path, out_dir) -> Path:
    """merge_adapter for an adapter of fused expert weights: peft's merge_and_unload, in the memory of
    the whole model (not streamed): each expert's update is peft's own arrangement of the wrapped
    3-d weight, which the streamed merge does not reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .lora import native_targets

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    with native_targets():
        merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        for extra in source.iterdir():  # tokenizer files, generation config
            if extra.is_file() and extra.suffix != ".safetensors" and not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
    return Path(out_dir)


def merge_adapter(base, adapter_path, out_dir) -> Path:
    """Merge a LoRA adapter into its unquantized base and write a plain checkpoint (safetensors,
    with the base's config and tokenizer) to out_dir, atomically.

    Streamed shard by shard: peak memory is about one shard of the base plus the adapter, not the
    model (a 70B base merges on a machine with a few GB of RAM). The result equals peft's
    `merge_and_unload` (W + scale * B @ A in the base's dtype). An adapter of fused expert weights
    (an MoE model's routed experts, peft's target_parameters) is merged by peft itself, in the memory
    of the whole model.

    Args:
        base: the checkpoint the adapter was trained on: a folder, an embedded alias or a Hub id.
        adapter_path: the adapter folder written by `heal` (output_dir/adapter).
        out_dir: where the merged checkpoint goes.
    """
    source = _checkpoint_folder(base)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{source} holds no .safetensors weights: merge_adapter needs the unquantized base checkpoint")
    if "quantization_config" in read_json(source / "config.json"):
        raise ValueError(
            f"{source} is a quantized checkpoint: merge the adapter into the full-precision base it was pruned "
            "from (save the pruned model before quantizing it, as notebook 02 does with QUANTIZE=None)."
        )
    if _fused_experts(Path(adapter_path)):
        return _merged_by_peft(source, Path(adapter_path), out_dir)
    factors = _lora_factors(Path(adapter_path))
    with atomic_dir(out_dir) as tmp:
        for shard in progress(shards, desc="merging adapter", unit="shard"):
            with safe_open(shard, framework="pt") as f:
                metadata = f.metadata()
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # one shard in memory
            for name, weight in tensors.items():
                if name in factors:
                    tensors[name] = weight + factors.pop(name).delta(weight.dtype)
            save_file(tensors, tmp / shard.name, metadata=metadata)
            del tensors
        if factors:
            raise ValueError(f"the adapter adapts weights the base {source} lacks: {', '.join(sorted(factors)[:3])}")
        for extra in source.iterdir():  # config, generation config, shard index, tokenizer files
            if extra.is_file() and extra.suffix != ".safetensors":
                shutil.copy2(extra, tmp / extra.name)
    return Path(out_dir)


def _removed_children(model, prefix: str) -> tuple[tuple[str, ...], set[str]]:
    """The checkpoint-name prefixes of the model's removed sublayers (RemovedSublayer children), by the indices
    of its layers as they are, which the written checkpoint's are (whole layers go before sublayers); and the
    names of their buffers, which kit.save_pruned writes as they are."""
    children = [(f"{prefix}{index}.{name}.", child.skeleton) for index, layer in enumerate(decoder_layers(model))
                for name, child in layer.named_modules() if isinstance(child, RemovedSublayer)]  # fmt: skip
    buffers = {start + name for start, skeleton in children for name, _ in skeleton.named_buffers()}
    return tuple(start for start, _ in children), buffers


def save_pruned_full_precision(model, tokenizer, out_dir) -> Path:
    """The checkpoint of a pruned model loaded 4-bit, written from the full-precision weights it was
    loaded from (model.name_or_path), streamed shard by shard: the layers it lacks dropped, the others
    renumbered, the parameters of its removed sublayers written as zeros (as kit.save_pruned writes them:
    plain transformers computes the pruned network), its pruned config without the quantization.
    merge_adapter takes it as a base (a 4-bit checkpoint it refuses); notebook 02 writes it with
    QUANTIZE="auto" on a model too big for the GPU."""
    source = _checkpoint_folder(model.name_or_path)
    base_pruned = pruned_before(SimpleNamespace(**read_json(source / "config.json")))
    total = model.config.num_hidden_layers + len(pruned_before(model.config))
    originals = [i for i in range(total) if i not in base_pruned]  # the base's layers, by original index
    kept = [i for i in range(total) if i not in pruned_before(model.config)]
    renumber = {s: kept.index(o) for s, o in enumerate(originals) if o in kept}  # base index -> pruned index
    prefix = anatomy(model).layers + "."
    removed, buffers = _removed_children(model, prefix)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with atomic_dir(out_dir) as tmp:
        index = {}
        for shard in progress(sorted(source.glob("*.safetensors")), desc="writing the pruned checkpoint", unit="shard"):
            tensors = {}
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    if not name.startswith(prefix):
                        tensors[name] = f.get_tensor(name)
                        continue
                    layer, rest = name.removeprefix(prefix).split(".", 1)
                    if int(layer) in renumber:
                        renamed = f"{prefix}{renumber[int(layer)]}.{rest}"
                        tensor = f.get_tensor(name)
                        zero = renamed.startswith(removed) and renamed not in buffers
                        tensors[renamed] = torch.zeros_like(tensor) if zero else tensor
                metadata = f.metadata()
            save_file(tensors, tmp / shard.name, metadata=metadata)
            index.update(dict.fromkeys(tensors, shard.name))
        if (source / "model.safetensors.index.json").exists():
            write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": index})
        write_json(tmp / "config.json", config)
        if (source / "generation_config.json").exists():
            shutil.copy2(source / "generation_config.json", tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
