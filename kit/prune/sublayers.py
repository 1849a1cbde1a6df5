"""Removing the attention (token mixer: attention, Mamba, linear attention) or MLP sublayers of a set of
decoder layers: each removed branch's child (kit.core.layers.Middle's `attention` or `mlp`) is replaced
by a RemovedSublayer returning zeros, so the layer adds nothing for it to the residual stream. kit.prune's
`dropped` and `drop_layers` dispatch here for a Sublayers; `save_pruned` writes the removed children's
parameters as zeros, a plain checkpoint that computes the same network."""

import copy
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..core import layers
from ..core.block import SUBLAYER_KINDS, Sublayers

PRUNED_SUBLAYERS = "pruned_sublayers"  # config attribute: {"attention": [...], "mlp": [...]}, indices of the model's layers


class RemovedSublayer(nn.Module):
    """Stands in for a removed branch child of a decoder layer: returns zeros shaped like its input hidden
    states (the last dimension `width`), as a bare tensor or the first of a tuple of `arity` entries (the
    rest None), as the child did. It never calls the child. A removed attention that kept keys and values
    (`caches`) writes one zero per token and layer into the KV cache, keys and values of shape
    [batch, 1, tokens, 1] under its `layer_idx`, so that the cache still counts positions.

    Args:
        kind: "attention" or "mlp".
        skeleton: the removed child, whose parameters may sit on the meta device: save_pruned writes
            its parameters as zeros and its buffers as they are. Not a submodule: it holds no weights.
        width: the last dimension of what the child returned.
        arity: the length of the tuple it returned, 0 for a bare tensor.
        caches: whether to keep the cache's count of positions for this layer.
    """

    def __init__(self, kind: str, skeleton: nn.Module, width: int, arity: int, caches: bool):
        super().__init__()
        self.kind, self.width, self.arity, self.caches = kind, width, arity, caches
        object.__setattr__(self, "skeleton", skeleton)  # unregistered: no parameters, no state-dict entries
        index = getattr(skeleton, "layer_idx", None)
        if caches and isinstance(index, int):
            self.layer_idx = index

    def forward(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        zeros = hidden.new_zeros(*hidden.shape[:-1], self.width)
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        if self.caches and cache is not None and hasattr(self, "layer_idx"):
            placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return (zeros, *[None] * (self.arity - 1)) if self.arity else zeros

    def extra_repr(self) -> str:
        return f"{self.kind}, width={self.width}, caches={self.caches}"


def removed_sublayers(config) -> dict[str, list[int]]:
    """{kind: layer indices} of the sublayers removed before (config.pruned_sublayers), every kind present."""
    recorded = getattr(config, PRUNED_SUBLAYERS, None) or {}
    return {kind: list(recorded.get(kind, [])) for kind in SUBLAYER_KINDS}


def _caches(config, index: int, num: int) -> bool:
    """Whether layer `index`'s attention keeps keys and values: every layer of a model without layer_types,
    those whose layer_types entry caches keys (layers.caches_keys) in a hybrid."""
    kinds = getattr(layers.text_config(config), "layer_types", None)
    return not isinstance(kinds, (list, tuple)) or len(kinds) != num or layers.caches_keys(kinds[index])


def _meta_copy(child: nn.Module) -> nn.Module:
    """A copy of `child` whose parameters sit on the meta device (no memory), its buffers copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in child.parameters()}
    return copy.deepcopy(child, memo)


def _swaps(model: nn.Module, removed: Sublayers, found: list[layers.Middle], *, meta: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """(layer, child name, RemovedSublayer) for every branch child `removed` names, by the layers' Middles
    `found`; the skeletons are the children themselves, or (`meta`) copies of them without their weights."""
    num = layers.num_layers(model)
    swaps = []
    for index in removed.layers:
        layer, middle = layers.decoder_layers(model)[index], found[index]
        names = (middle.attention,) if removed.kind == "attention" else middle.mlp
        if not all(names):
            raise layers.UnsupportedArchitectureError(
                f"layer {index} ({type(layer).__name__}) has no {removed.kind} branch the kit can tell; remove whole layers instead."
            )
        caches = removed.kind == "attention" and _caches(model.config, index, num)
        for name in names:
            child = getattr(layer, name)
            skeleton = _meta_copy(child) if meta else child
            swaps.append((layer, name, RemovedSublayer(removed.kind, skeleton, *middle.output(name), caches)))
    return swaps


def _recorded(model: nn.Module, removed: Sublayers) -> dict[str, list[int]]:
    """config.pruned_sublayers after removing `removed`; a sublayer removed before is refused."""
    removed.check(layers.num_layers(model))
    recorded = removed_sublayers(model.config)
    again = sorted(set(recorded[removed.kind]) & set(removed.layers))
    if again:
        raise ValueError(
            f"The {removed.kind} of layers {again} is already removed (config.{PRUNED_SUBLAYERS} = {recorded}): "
            "name each sublayer once, and only those still there."
        )
    recorded[removed.kind] = sorted(recorded[removed.kind] + list(removed.layers))
    return recorded


def refuse_whole_layers(model: nn.Module) -> None:
    """Refuse removing whole layers from a model with removed sublayers: their indices would shift."""
    recorded = getattr(model.config, PRUNED_SUBLAYERS, None)
    if recorded and any(recorded.values()):
        raise ValueError(
            f"This model has removed sublayers (config.{PRUNED_SUBLAYERS} = {recorded}), which name layers by index: "
            "remove whole layers first, then sublayers (drop_layers(model, layers), then drop_layers(pruned, Sublayers(...)))."
        )


@contextmanager
def dropped_sublayers(model: nn.Module, removed: Sublayers):
    """`model` with the sublayers `removed` names replaced by RemovedSublayer for a `with` block; on exit,
    even on an exception, the children and config.pruned_sublayers are restored exactly.

    Args:
        model: the causal LM.
        removed: the attention or MLP sublayers to remove.
    """
    recorded = _recorded(model, removed)
    swaps = _swaps(model, removed, layers.middles(model), meta=False)
    before = getattr(model.config, PRUNED_SUBLAYERS, None)
    originals = [(layer, name, getattr(layer, name)) for layer, name, _ in swaps]
    try:
        for layer, name, stand_in in swaps:
            setattr(layer, name, stand_in)
        setattr(model.config, PRUNED_SUBLAYERS, recorded)
        yield model
    finally:
        for layer, name, child in originals:
            setattr(layer, name, child)
        if before is None:
            vars(model.config).pop(PRUNED_SUBLAYERS, None)
        else:
            setattr(model.config, PRUNED_SUBLAYERS, before)


def drop_sublayers(model: nn.Module, removed: Sublayers, *, inplace: bool = False) -> nn.Module:
    """`model` with the sublayers `removed` names replaced by RemovedSublayer, their weights freed (kept on
    the meta device for save_pruned); config.pruned_sublayers records them.

    Args:
        model: the causal LM (pruned before or not).
        removed: the attention or MLP sublayers to remove, each not removed before.
        inplace: prune `model` itself; without it a deep copy is pruned.
    """
    recorded = _recorded(model, removed)
    found = layers.middles(model)  # before copying: a copy's layers are new objects, which the probe would run again
    if not inplace:
        model = copy.deepcopy(model)
    for layer, name, stand_in in _swaps(model, removed, found, meta=True):
        setattr(layer, name, stand_in)
    setattr(model.config, PRUNED_SUBLAYERS, recorded)
    return model


def reapply(model: nn.Module) -> nn.Module:
    """`model`, a reloaded checkpoint whose config.pruned_sublayers names removed sublayers (children with zero
    parameters), with those children replaced by RemovedSublayer in place: their weights freed, their KV
    cache no longer kept, what it computes unchanged. kit.load_model calls it.

    Args:
        model: the causal LM, as loaded.
    """
    recorded = {kind: indices for kind, indices in removed_sublayers(model.config).items() if indices}
    found = layers.middles(model) if recorded else []
    for kind, indices in recorded.items():
        for layer, name, stand_in in _swaps(model, Sublayers(kind, indices), found, meta=True):
            setattr(layer, name, stand_in)
    return model


def _zeroed(skeleton: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `skeleton` whose parameters are zeros (on `device` where they sit on the meta device)."""
    where = lambda p: device if p.is_meta else p.device  # noqa: E731
    memo = {id(p): nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=where(p)), p.requires_grad) for p in skeleton.parameters()}
    return copy.deepcopy(skeleton, memo)


def _mapped(device_map: dict, name: str) -> torch.device | None:
    """Where accelerate's device map (hf_device_map) puts the module `name`, by its longest enclosing entry; a
    module offloaded to the CPU or disk on the CPU, where its weights are read from."""
    keys = [key for key in device_map if key in ("", name) or name.startswith(key + ".")]
    if not keys:
        return None
    value = device_map[max(keys, key=len)]
    return torch.device("cuda", value) if isinstance(value, int) else torch.device("cpu" if value == "disk" else value)


def _layer_devices(model: nn.Module) -> dict[int, torch.device]:
    """{id of each module inside a decoder layer: its layer's device}: the device of the layer's parameters; for a
    layer whose weights accelerate offloaded (on the meta device), or with no parameters left, where its device
    map puts it; else the device of the layer before it (of the model's first parameter for layer 0)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    prefix = layers.anatomy(model).layers
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    devices = {}
    for index, layer in enumerate(layers.decoder_layers(model)):
        own = next((p.device for p in layer.parameters()), None)
        mapped = _mapped(device_map, f"{prefix}.{index}")
        device = mapped if mapped is not None and (own is None or own.type == "meta") else own or device
        devices.update(dict.fromkeys(map(id, layer.modules()), device))
    return devices


@contextmanager
def materialised(model: nn.Module):
    """`model` with every RemovedSublayer replaced by its child with zero parameters, for a `with` block (a
    save): a plain checkpoint then computes what the pruned model does (zero weights make an attention,
    Mamba, linear-attention or MLP child return exactly zero). Each child's zeros sit on its own layer's
    device (_layer_devices): a model dispatched over GPUs gets back on each GPU at most what its removed
    children held there before."""
    stand_ins = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if isinstance(child, RemovedSublayer)]  # fmt: skip
    devices = _layer_devices(model) if stand_ins else {}
    try:
        for parent, name, child in stand_ins:
            setattr(parent, name, _zeroed(child.skeleton, devices[id(parent)]))
        yield model
    finally:
        for parent, name, child in stand_ins:
            setattr(parent, name, child)


def removed_attention(model: nn.Module) -> set[int]:
    """Indices of the layers whose attention is a RemovedSublayer keeping the cache's count of positions."""
    return {
        index for index, layer in enumerate(layers.decoder_layers(model))
        if any(isinstance(m, RemovedSublayer) and m.kind == "attention" and m.caches for m in layer.children())
    }  # fmt: skip
