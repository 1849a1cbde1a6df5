"""LoRA adapters for healing, after the paper's Appendix A: which modules of an architecture they adapt
(its MLP projections, or all linear layers), fresh adapters on a (4-bit NF4) base, the targets peft
must take as they are, and a re-quantized copy of a model. kit.healing.train trains them (`heal`),
kit.healing.merge merges them into the weights."""

import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from torch import nn
from transformers import set_seed

from ..core import layers
from ..core.config import HealConfig
from ..core.device import model_device
from ..loaders.models import load_model
from ..prune.sublayers import materialised


def target_modules(model: nn.Module, config: HealConfig) -> list[str] | str:
    """The module names LoRA adapts: the architecture's MLP projections (for MoE, the projections of
    the shared experts and of routed experts that are modules), all linear layers, or the names
    given in the config."""
    if config.target_modules == "mlp":
        if not layers.mlp_modules(model) and not layers.mlp_parameters(model):
            raise ValueError(
                f"the {model.config.model_type!r} layers have no MLP the kit recognises: heal with "
                "HealConfig(target_modules='all-linear') or name the modules to adapt as a tuple (a Mamba stack has no MLP, "
                "and peft refuses its mixers' out_proj and conv1d: target_modules=('in_proj',))"
            )
        return layers.mlp_modules(model)
    if config.target_modules == "all-linear":
        return "all-linear"
    if isinstance(config.target_modules, str):
        raise ValueError(
            f"target_modules must be 'mlp', 'all-linear' or a tuple of module names, not {config.target_modules!r}"
        )
    return list(config.target_modules)


def target_parameters(model: nn.Module, config: HealConfig) -> list[str]:
    """Fused expert weights LoRA adapts through peft's `target_parameters` (3-d parameters holding
    every routed expert, e.g. `mlp.experts.gate_up_proj`), with target_modules="mlp" only."""
    return layers.mlp_parameters(model) if config.target_modules == "mlp" else []


@contextmanager
def native_targets():
    """peft (0.21) rewrites the LoRA targets of the model types whose MoE experts transformers 5 fused,
    as if the adapter had been made for transformers 4: every target ending in gate_proj, up_proj or
    down_proj becomes the fused expert weights, so the dense MLPs and shared experts of DeepSeek-V3 or
    Qwen3-Next lose their adapters (and the fused weights get a doubled rank). The kit's targets are
    transformers 5 names already (layers.mlp_modules, mlp_parameters): while adapters are made or loaded
    in this context, peft takes them as they are."""
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def lora_model(model: nn.Module, config: HealConfig):
    """`model` (modified in place) with fresh LoRA adapters on its target modules, ready to train:
    a 4-bit base goes through peft's prepare_model_for_kbit_training first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    parameters = target_parameters(model, config)
    if parameters and config.dropout:
        warnings.warn(
            f"LoRA on the fused expert weights {parameters} (peft's target_parameters) works only without dropout: "
            f"every adapter of this model trains with lora_dropout=0 instead of {config.dropout}.",
            stacklevel=2,
        )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0 if parameters else config.dropout,
        target_modules=target_modules(model, config),
        target_parameters=parameters or None,
        fan_in_fan_out=layers.weights_transposed(model),
        task_type="CAUSAL_LM",
    )
    set_seed(config.seed)  # the adapters' initialisation
    with native_targets():
        return get_peft_model(model, lora)


def _placement(model: nn.Module, quantize: str | None) -> dict:
    """load_model's placement of a copy of `model`: its device; for a model accelerate dispatched, its device
    map (a 70B over its GPUs, not whole on the first), but accelerate's own plan ("auto") for a 4-bit copy of
    a model offloaded to the CPU or disk: bitsandbytes offloads no 4-bit weights, and the copy is smaller."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {"device": model_device(model)}
    offloaded = quantize is not None and {"cpu", "disk"} & set(device_map.values())
    return {"device_map": "auto" if offloaded else dict(device_map)}


def reloaded(model: nn.Module, tokenizer, quantize: str | None, scratch: Path) -> nn.Module:
    """A new copy of `model` (quantized if asked), placed as it is (_placement), loaded from a temporary
    checkpoint in `scratch`: how a 4-bit model is copied (bitsandbytes quantizes while loading). A copy with
    layers offloaded to disk reads their weights from that checkpoint, which then stays in `scratch`."""
    scratch.mkdir(parents=True, exist_ok=True)
    placement = _placement(model, quantize)
    on_disk = isinstance(placement.get("device_map"), dict) and "disk" in placement["device_map"].values()
    if on_disk:
        folder = nullcontext(tempfile.mkdtemp(dir=scratch, prefix=".offloaded."))
    else:
        folder = tempfile.TemporaryDirectory(dir=scratch, prefix=".unquantized.")
    with folder as tmp, materialised(model):
        model.save_pretrained(tmp)  # removed sublayers as zero weights, which load_model removes again
        tokenizer.save_pretrained(tmp)
        offload = Path(tmp) / "offload" if on_disk else None  # weights transformers converts while loading
        quantized = load_model(tmp, quantize=quantize, offload_folder=offload, **placement)[0]
    quantized.name_or_path, quantized.config._name_or_path = model.name_or_path, model.config._name_or_path  # not tmp
    return quantized


@contextmanager
def adapted_in_place(model: nn.Module, adapt: Callable[[nn.Module], nn.Module]):
    """`adapt(model)` (e.g. kit.heal on the model itself, which puts LoRA adapters on it in place) for a
    `with` block, without a copy of the weights; afterwards its adapters are taken off (peft's unload,
    nothing merged) and what training changed is put back: which parameters require gradients, train or
    eval mode, config.use_cache and activation checkpointing. The weights themselves stay frozen."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    training, use_cache, checkpointing = model.training, model.config.use_cache, model.is_gradient_checkpointing
    adapted = adapt(model)
    try:
        yield adapted
    finally:
        adapted.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
        if model.is_gradient_checkpointing and not checkpointing:
            model.gradient_checkpointing_disable()
        for parameter, flag in grads:
            parameter.requires_grad_(flag)
        model.train(training)
        model.config.use_cache = use_cache


@contextmanager
def kept_dtypes(model: nn.Module):
    """The dtypes of `model`'s parameters as they are now, put back after the block: peft's
    prepare_model_for_kbit_training upcasts a 4-bit model's embeddings, norms and head to fp32 for
    training, and the healed model must then compute (residual stream, KV cache) as its base did.
    Parameters added in the block (the LoRA adapters) keep theirs."""
    dtypes = [(p, p.dtype) for p in model.parameters()]
    try:
        yield
    finally:
        for parameter, dtype in dtypes:
            if parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
