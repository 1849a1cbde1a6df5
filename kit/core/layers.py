"""The one place that knows architectures: where a causal LM keeps its decoder layers, its final
norm, its MLP projections and each layer's middle (between its attention and MLP sublayers). They
are found from the model's own structure and transformers' conventions (`get_decoder()`, which also
reaches the text tower of a multimodal model, the config's `num_hidden_layers`, `get_output_embeddings()`;
the middle from what each layer's children read in one forward pass); ANATOMIES names the families that
break the convention. Everything else in the kit asks this module."""

import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicLayer
from transformers.pytorch_utils import Conv1D

from .device import model_device


@dataclass(frozen=True)
class Anatomy:
    """Dotted paths inside a causal-LM model (final_norm None: the model has none), and the LoRA
    targets of its MLPs: module names, which peft matches as suffixes, and fused expert weights
    (3-d parameters, peft's `target_parameters`)."""

    layers: str
    final_norm: str | None
    mlp: tuple[str, ...]
    mlp_parameters: tuple[str, ...] = ()


ANATOMIES: dict[str, Anatomy] = {}  # model_type -> Anatomy, for families the generic search gets wrong

FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")  # decoder children
MLPS = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")  # a decoder layer's MLP children by name; also
# any child whose class is an MLP or MoE block (MLP_CLASSES: Granite 4's shared_mlp, Nemotron-H's MLP and MoE mixers)
MLP_CLASSES = ("mlp", "moe")  # endings of such class names, lower case
ROUTERS = ("gate", "router", "shared_expert_gate", "wg")  # linear maps inside an MLP that are not projections
LAYER_THRESHOLDS = ("max_window_layers", "first_k_dense_replace")  # config ints: "the layers below this index"
DEPTH_ALIASES = ("num_blocks",)  # config ints repeating num_hidden_layers under another name (xLSTM)
DEPTH_SCALED = ("scale_depth",)  # config numbers every layer reads as value / sqrt(num_hidden_layers) (MiniCPM3's
# residual scale): rescaled by sqrt(new / old depth) when layers go, so each kept layer computes what it did
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "attn_layer_indices")  # config lists of layer indices
PER_LAYER_WEIGHTS = {"embed_tokens_per_layer": 1, "per_layer_model_projection": 0}  # decoder modules whose weight
# packs one slice per layer along this dimension (Gemma 3n and 4's per-layer inputs)
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_number")  # a module's own layer index (the KV cache's key)
BUFFER_SEEDS = {"MiniMaxLightningAttention": ("num_hidden_layers",)}  # module class -> attributes read only to
# compute persistent buffers (MiniMax's per-layer decay rates, from the layer's depth fraction), which a saved
# checkpoint carries and a reload restores: a kept layer reloads the same though the depth changed

_FOUND: "weakref.WeakKeyDictionary[nn.Module, Anatomy]" = weakref.WeakKeyDictionary()


class UnsupportedArchitectureError(ValueError):
    pass


def _base(model: nn.Module) -> nn.Module:
    """Unwrap a peft model to the causal LM underneath."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(config):
    """The configuration of the text decoder: `config` itself, or a multimodal model's text config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unsupported(model_type, looked_for: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"Architecture {model_type!r} is not supported: {looked_for}. If it is a decoder-only language model, "
        "add its paths to kit/core/layers.py:ANATOMIES."
    )


def _mlp_children(layer: nn.Module) -> list[str]:
    """Names of a decoder layer's MLP (or MoE) children: named in MLPS, or of a class ending in MLP_CLASSES."""
    return [name for name, m in layer.named_children() if name in MLPS or type(m).__name__.lower().endswith(MLP_CLASSES)]


def _mlp_targets(layer_list: nn.ModuleList) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of the linear projections inside every layer's MLP children (routers excluded; an expert's
    index dropped, so one name covers all experts), else the layer's own linear children, and the
    MLPs' 3-d fused expert weights."""
    modules, parameters = {}, {}
    for layer in layer_list:
        children = _mlp_children(layer)
        if not children:  # projections directly on the layer (OPT's fc1, fc2)
            modules.update({name: None for name, m in layer.named_children() if isinstance(m, (nn.Linear, Conv1D))})
        for child in children:
            for name, module in getattr(layer, child).named_modules():
                parts = name.split(".")
                if isinstance(module, (nn.Linear, Conv1D)) and not set(parts) & set(ROUTERS):  # nor inside a router
                    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
                    tail = parts[numeric[-1] + 1 :] if numeric else []  # after an expert's index; CTRL's ffn.0 has none
                    modules[".".join(tail) if tail else f"{child}.{name}"] = None
                for pname, parameter in module.named_parameters(recurse=False):
                    if parameter.dim() == 3 and "expert" in f"{name}.{type(module).__name__}".lower():  # JetMoE's ParallelExperts
                        parameters[".".join(filter(None, [child, name, pname]))] = None
    return tuple(modules), tuple(parameters)


def _find(base: nn.Module) -> Anatomy:
    """The Anatomy of `base` from its structure: the decoder is `get_decoder()` (else `base_model`), its
    layers the ModuleList of config.num_hidden_layers modules nearest to it, its final norm a child
    named in FINAL_NORMS (or the one norm registered after the layers)."""
    model_type = getattr(base.config, "model_type", None)
    num = getattr(text_config(base.config), "num_hidden_layers", None)
    if not isinstance(num, int):
        raise _unsupported(model_type, "looked for config.num_hidden_layers (or the text config's) and found none")
    candidates = (base.get_decoder() if hasattr(base, "get_decoder") else base, base.base_model)
    for decoder in candidates:
        lists = [(name, m) for name, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num]
        if lists:
            break
    else:
        raise _unsupported(
            model_type, f"looked for a ModuleList of {num} modules (config.num_hidden_layers) under get_decoder() "
            f"({type(candidates[0]).__name__}) and base_model ({type(candidates[1]).__name__}) and found none"
        )  # fmt: skip
    prefix = next(name for name, module in base.named_modules() if module is decoder)
    name, layer_list = min(lists, key=lambda item: item[0].count("."))
    children = dict(decoder.named_children())
    norm = next((n for n in FINAL_NORMS if n in children), None)
    if norm is None and "." not in name:
        after = list(children)[list(children).index(name) + 1 :]
        norms = [n for n in after if "norm" in type(children[n]).__name__.lower()]
        norm = norms[0] if len(norms) == 1 else None
    if norm is None and hasattr(decoder, "final_layer_norm"):  # a norm attribute left None (OPT-350m)
        norm = "final_layer_norm"
    mlp, mlp_parameters = _mlp_targets(layer_list)
    path = lambda child: ".".join(filter(None, [prefix, child]))  # noqa: E731
    return Anatomy(path(name), path(norm) if norm else None, mlp, mlp_parameters)


def anatomy(model: nn.Module) -> Anatomy:
    """The Anatomy of `model` (a causal LM, possibly wrapped by peft): ANATOMIES[model_type], else found
    from its structure (once per model object)."""
    base = _base(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type in ANATOMIES:
        return ANATOMIES[model_type]
    if not isinstance(base, nn.Module) or getattr(base, "config", None) is None:
        raise _unsupported(model_type, "looked for a transformers model with a config")
    if base not in _FOUND:
        _FOUND[base] = _find(base)
    return _FOUND[base]


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


def decoder(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (the text tower's decoder of a multimodal model)."""
    parent = anatomy(model).layers.rpartition(".")[0]
    return _resolve(model, parent) if parent else _base(model)


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Replace the decoder layer list (the caller keeps config and indices consistent)."""
    setattr(decoder(model), anatomy(model).layers.rpartition(".")[2], layers)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last layer (None for models without one, e.g. OPT-350m)."""
    path = anatomy(model).final_norm
    return None if path is None else _resolve(model, path)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mlp_modules(model: nn.Module) -> list[str]:
    """LoRA target names for the MLP projections (peft matches them as name suffixes): for MoE, the
    shared and routed experts' projections that are modules of their own."""
    return list(anatomy(model).mlp)


def mlp_parameters(model: nn.Module) -> list[str]:
    """LoRA targets for fused expert weights (3-d parameters such as `mlp.experts.gate_up_proj`), for
    peft's `target_parameters`; empty for dense models."""
    return list(anatomy(model).mlp_parameters)


def body(model: nn.Module) -> nn.Module:
    """The transformer under the LM head: its output is the residual stream after the final norm."""
    return _base(model).base_model


def readout(model: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last layer -> the LM head's input: the final norm, then the
    output projection of models that have one (OPT-350m's project_out)."""
    norm = final_norm(model)
    hidden = norm(residual) if norm is not None else residual
    project = getattr(decoder(model), "project_out", None)
    return project(hidden) if project is not None else hidden


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection from hidden states to the vocabulary."""
    return _base(model).get_output_embeddings()


def caches_keys(kind) -> bool:
    """Whether a layer of this kind (a `layer_types` entry) keeps keys and values per token, as transformers'
    DynamicCache builds it: full, sliding, chunked and indexed attention do, and so do "hybrid" layers
    (attention beside a recurrent state, Falcon-H1, Zamba); recurrent layers (Mamba, linear attention, conv)
    and layers without a cache ("dummy", "moe", "mlp") do not. A kind transformers does not map counts as
    attention when its name says so ("attention", not "linear_attention")."""
    if not isinstance(kind, str):
        return False
    if kind in DYNAMIC_LAYER_TYPE_MAPPING:
        return issubclass(DYNAMIC_LAYER_TYPE_MAPPING[kind], DynamicLayer)
    return "attention" in kind and not kind.startswith("linear")


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states, with the architecture's final soft-capping if any (Gemma 2)."""
    out = lm_head(model)(hidden)
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return out if cap is None else torch.tanh(out / cap) * cap
class EndOfLayers(Exception):
    """Raised by a LayerTap after the last decoder layer: the final norm and LM head are skipped."""


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or as `hidden_states`)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (alone, or first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


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


@dataclass(frozen=True)
class Middle:
    """Where a decoder layer's middle is read: the residual stream after its attention (or mixer) branch,
    before its MLP branch. `reads`: the child of the layer whose input it is (a sequential layer).
    A parallel-residual layer (Phi, GPT-NeoX), which adds both branches to its input, never forms
    that sum: its middle is its input plus the attention branch (attention first), taken as its output
    less the outputs of its MLP children `subtracts`.

    Which children are the branches, for removing them: `attention`, the child whose output is the
    attention (or Mamba, linear-attention) branch; `mlp`, the MLP children (or, in a layer without one,
    such as OPT's, its projections after the middle); `outputs`, for each of these (child, width of the
    hidden states it returns, length of the tuple it returns, 0 for a bare tensor)."""

    reads: str | None = None
    subtracts: tuple[str, ...] = ()
    attention: str | None = None
    mlp: tuple[str, ...] = ()
    outputs: tuple[tuple[str, int, int], ...] = ()

    def __str__(self) -> str:
        return f"input of {self.reads}" if self.reads else f"output - {' - '.join(self.subtracts)} (parallel residual)"

    def output(self, child: str) -> tuple[int, int]:
        """(width, tuple length or 0) of what the branch child `child` returns."""
        return next((width, arity) for name, width, arity in self.outputs if name == child)


_MIDDLES: "weakref.WeakKeyDictionary[nn.Module, Middle]" = weakref.WeakKeyDictionary()


def middles(model: nn.Module) -> list[Middle]:
    """Each decoder layer's Middle, found from one forward pass of four tokens (once per layer object).

    A sequential layer's middle is a hidden-sized tensor that a child of the layer reads and that is
    neither the layer's input nor a child's output (the residual add's sum): the last such tensor read
    up to the first call of an MLP child (kit.core.layers.MLPS), i.e. by the norm before the MLP (Llama's
    post_attention_layernorm, Gemma 2's pre_feedforward_layernorm, GPT-2's ln_2) or by the MLP itself
    (OLMo 2); what the layer adds after its MLP (Gemma 4's per-layer input) counts to its MLP sublayer.
    A layer whose children read no such tensor has a parallel residual, which is checked: its output
    must be its input plus one child's output plus its MLP children's outputs. Raises
    UnsupportedArchitectureError for a layer with no MLP child (pure Mamba stacks), one whose output is
    a child's (post-norm layers such as OPT-350m's, or whose children add the residual themselves), or,
    with no MLP child to order them, several candidates. Each Middle also names the layer's branch children
    (`attention`, `mlp`) and what they return, which removing sublayers (kit.prune.sublayers) replaces."""
    layer_list = decoder_layers(model)
    if not all(layer in _MIDDLES for layer in layer_list):
        base = _base(model)
        ids = torch.tensor([[1, 2, 3, 4]], device=model_device(base))
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad(), _MiddleProbe(model) as probe:
                probe.run(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            base.train(was_training)
    return [_MIDDLES[layer] for layer in layer_list]


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a module was called with: `hidden_states=`, else its first positional argument."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden if isinstance(hidden, torch.Tensor) else None


class _MiddleProbe(LayerTap):
    """Records, inside each decoder layer, what each child read and returned (the tensor itself, kept alive so
    that no later tensor takes its storage, and a copy that in-place additions cannot change), and decides the
    layer's Middle."""

    def __enter__(self):
        for layer in self.layers:  # before LayerTap's hooks: the last layer's ends the pass
            for name, child in layer.named_children():
                self.handles.append(child.register_forward_hook(partial(self._record, name), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._decide))
        return super().__enter__()

    def _record(self, name, module, args, kwargs, output):
        returned = layer_output(output)
        returned = returned if isinstance(returned, torch.Tensor) else None
        if returned is not None and name not in self.shapes:
            self.shapes[name] = (returned.shape[-1], len(output) if isinstance(output, (tuple, list)) else 0)
        self.calls.append((name, _hidden_argument(args, kwargs), None if returned is None else returned.detach().clone(), returned))

    def on_input(self, args, kwargs):
        self.input, self.calls, self.shapes = layer_input(args, kwargs), [], {}

    def on_output(self, hidden):
        pass

    def _decide(self, layer, args, output):
        x, out, mlps = self.input, layer_output(output), _mlp_children(layer)
        where = f"layer {next(i for i, m in enumerate(self.layers) if m is layer)} ({type(layer).__name__})"
        whole = "scan its whole layers (sublayers=False)"
        produced = {_storage(x)} | {_storage(returned) for *_, returned in self.calls if returned is not None}
        if _storage(out) in produced:
            raise UnsupportedArchitectureError(
                f"{where} returns a child's output: a post-norm layer, or one whose children add the residual "
                f"themselves, has no residual stream between its sublayers to read: {whole}"
            )
        first_mlp = next((k for k, (name, *_) in enumerate(self.calls) if name in mlps), len(self.calls) - 1)
        hidden_sized = lambda t: t is not None and t.shape[-1] == x.shape[-1] and t.numel() == x.numel()  # noqa: E731
        reads = [(name, read) for name, read, *_ in self.calls[: first_mlp + 1]]  # up to the first MLP child's call
        candidates = [name for name, read in reads if hidden_sized(read) and _storage(read) not in produced]
        if candidates and (mlps or len(candidates) == 1):
            _MIDDLES[layer] = self._sequential(layer, candidates[-1], mlps)
            return
        if candidates:
            raise UnsupportedArchitectureError(
                f"{where}: its children {', '.join(candidates)} each read a sum made inside the layer, and it has no MLP "
                f"child to tell which is the residual stream between its attention and MLP sublayers: {whole}"
            )
        if not mlps:
            raise UnsupportedArchitectureError(
                f"{where} has no MLP child (children: {', '.join(n for n, _ in layer.named_children())}), so no "
                f"attention and MLP sublayers: {whole}"
            )
        attention = out.float() - x.float() - sum(o.float() for name, _, o, _ in self.calls if name in mlps)
        tolerance = 4 * torch.finfo(out.dtype).eps * out.abs().max().float()
        close = lambda o: o is not None and o.shape == out.shape and (attention - o.float()).abs().max() <= tolerance  # noqa: E731
        attention = next((name for name, _, o, _ in self.calls if name not in mlps and close(o)), None)
        if attention is None:
            raise UnsupportedArchitectureError(
                f"{where}: no child reads the residual stream between its attention and MLP sublayers, yet its output "
                f"is not its input plus one child's output plus its MLP's ({', '.join(mlps)}): {whole}"
            )
        _MIDDLES[layer] = self._middle(subtracts=tuple(mlps), attention=attention, mlp=tuple(mlps))

    def _sequential(self, layer: nn.Module, reads: str, mlps: list[str]) -> Middle:
        """The Middle of a sequential layer whose middle `reads` reads: its attention branch is the first child
        called before that read that is not a norm; its MLP branch the MLP children `mlps`, else (OPT) the
        children with parameters called after the read that are not norms."""
        names = [name for name, *_ in self.calls]
        at = len(names) - 1 - names[::-1].index(reads)  # the middle's read
        norm = lambda name: "norm" in type(getattr(layer, name)).__name__.lower()  # noqa: E731
        attention = next((name for name in names[:at] if not norm(name) and name in self.shapes), None)
        if not mlps:
            weighted = lambda name: next(getattr(layer, name).parameters(), None) is not None  # noqa: E731
            mlps = list(dict.fromkeys(n for n in names[at + 1 :] if weighted(n) and not norm(n) and n in self.shapes))
        return self._middle(reads=reads, attention=attention, mlp=tuple(mlps))

    def _middle(self, *, attention: str | None, mlp: tuple[str, ...], **where) -> Middle:
        outputs = tuple((name, *self.shapes[name]) for name in filter(None, (attention, *mlp)))
        return Middle(**where, attention=attention, mlp=mlp, outputs=outputs)


def _storage(tensor) -> int | None:
    """Where a tensor's data lives: a view (a reshape, a slice) lives where what it views does."""
    return tensor.untyped_storage().data_ptr() if isinstance(tensor, torch.Tensor) else None
