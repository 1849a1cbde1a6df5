"""The one place that knows architectures: where each keeps its decoder layers, its final
norm and its MLP projections. Everything else in the kit asks this module."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Anatomy:
    """Dotted paths inside a causal-LM model, and the MLP projection names LoRA targets."""

    layers: str
    final_norm: str
    mlp: tuple[str, ...]


_LLAMA_LIKE = Anatomy("model.layers", "model.norm", ("gate_proj", "up_proj", "down_proj"))

ANATOMIES: dict[str, Anatomy] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": Anatomy("model.layers", "model.norm", ("gate_up_proj", "down_proj")),
    "phi": Anatomy("model.layers", "model.final_layernorm", ("fc1", "fc2")),
    "gpt2": Anatomy("transformer.h", "transformer.ln_f", ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": Anatomy(
        "gpt_neox.layers", "gpt_neox.final_layer_norm", ("dense_h_to_4h", "dense_4h_to_h")
    ),
    "opt": Anatomy("model.decoder.layers", "model.decoder.final_layer_norm", ("fc1", "fc2")),
}


LAYER_THRESHOLDS = ("max_window_layers",)  # config ints meaning "the layers below this index" (Qwen2/3)


class UnsupportedArchitectureError(ValueError):
    pass


def anatomy(model: nn.Module) -> Anatomy:
    """The Anatomy of `model` (a causal LM, possibly wrapped by peft), by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ANATOMIES:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported. Supported model types: "
            f"{', '.join(sorted(ANATOMIES))}. Add its paths to kit/layers.py:ANATOMIES."
        )
    return ANATOMIES[model_type]


def _base(model: nn.Module) -> nn.Module:
    """Unwrap a peft model to the causal LM underneath."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _resolve(model: nn.Module, path: str):
    obj = _base(model)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers, in order."""
    return _resolve(model, anatomy(model).layers)


def weights_transposed(model: nn.Module) -> bool:
    """Whether the model stores projection weights as (in, out), as GPT-2's Conv1D does (LoRA's fan_in_fan_out)."""
    return any(isinstance(m, Conv1D) for m in _base(model).modules())


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Replace the decoder layer list (the caller keeps config and indices consistent)."""
    *parents, name = anatomy(model).layers.split(".")
    setattr(_resolve(model, ".".join(parents)), name, layers)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last layer (None for models without one, e.g. OPT-350m)."""
    return _resolve(model, anatomy(model).final_norm)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mlp_modules(model: nn.Module) -> list[str]:
    """LoRA target names for the MLP projections (peft matches them as name suffixes)."""
    return list(anatomy(model).mlp)


def body(model: nn.Module) -> nn.Module:
    """The transformer under the LM head: its output is the residual stream after the final norm."""
    return _base(model).base_model


def readout(model: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last layer -> the LM head's input: the final norm, then the
    output projection of models that have one (OPT-350m's project_out)."""
    norm = final_norm(model)
    hidden = norm(residual) if norm is not None else residual
    project = getattr(_resolve(model, anatomy(model).final_norm.rpartition(".")[0]), "project_out", None)
    return project(hidden) if project is not None else hidden


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection from hidden states to the vocabulary."""
    return _base(model).get_output_embeddings()


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states, with the architecture's final soft-capping if any (Gemma 2)."""
    out = lm_head(model)(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return out if cap is None else torch.tanh(out / cap) * cap


class EndOfLayers(Exception):
    """Raised by a LayerTap after the last decoder layer: the final norm and LM head are skipped."""


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or as `hidden_states`)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (alone, or first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class LayerTap:
    """Forward hooks on every decoder layer, as a context manager: `on_input(args, kwargs)` before
    each layer, `on_output(hidden)` after the last one, which then stops the pass. `run(**inputs)`
    does one such pass. Subclasses say what to keep."""

    def __init__(self, model: nn.Module):
        self.model, self.layers, self.handles = model, decoder_layers(model), []

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
        self.handles.append(self.layers[-1].register_forward_hook(self._after))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _before(self, module, args, kwargs):
        self.on_input(args, kwargs)

    def _after(self, module, args, output):
        self.on_output(layer_output(output))
        raise EndOfLayers

    def run(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except EndOfLayers:
            pass

    def on_input(self, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def on_output(self, hidden: torch.Tensor) -> None:
        raise NotImplementedError
