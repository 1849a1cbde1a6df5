"""The units a set criterion removes, named one way for the whole kit.choose package, and removing them
from a model for a moment with forward hooks: a whole layer returns its input, an attention (or mixer)
or MLP branch returns zeros, so its contribution to the residual stream is zero (DESIGN.md, "Units
other than a block"). Nothing is copied or edited; the hooks go on exit."""

from contextlib import contextmanager
from functools import partial

import torch

from ..core import layers
from ..core.block import Layers
from ..core.device import model_device

UNITS = ("layers", "attention", "mlp")  # what a set criterion removes: whole layers, or one branch of each layer
SUBLAYERS = ("attention", "mlp")


def unit_set(unit: str, indices) -> Layers | tuple[str, tuple[int, ...]]:
    """A chosen set of units: Layers for whole layers; (kind, sorted layer indices) for sublayers.

    Args:
        unit: one of UNITS.
        indices: the layers whose unit is removed, any iterable of integers.
    """
    if unit == "layers":
        return Layers(indices)
    if unit not in SUBLAYERS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return unit, Layers(indices).indices  # kit.core.block.Sublayers(unit, indices) once that exists


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _call_order(model) -> list[list[str]]:
    """The names of each decoder layer's children in the order one forward pass of four tokens calls them."""
    decoder = layers.decoder_layers(model)
    order: list[list[str]] = [[] for _ in decoder]

    def called(i, name, module, args):
        if name not in order[i]:
            order[i].append(name)

    handles = [child.register_forward_pre_hook(partial(called, i, name))
               for i, layer in enumerate(decoder) for name, child in layer.named_children()]  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4]], device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return order


def branch_children(model, kind: str) -> list[tuple[str, ...]]:
    """For each decoder layer, the names of the children whose outputs make its `kind` branch.

    "mlp": the layer's MLP and MoE children (kit.core.layers' MLPS and MLP_CLASSES: Granite 4's
    block_sparse_moe and shared_mlp together). "attention": the first child with parameters, neither a
    norm nor an MLP, that the layer calls before its middle (kit.core.layers.middles) is read: Llama's
    self_attn, a hybrid's mamba. Zeroing these outputs zeroes the branch where what follows them maps 0
    to 0 (no bias), as in the RMS-normed families. Raises ValueError for a layer without such a child."""
    if kind not in SUBLAYERS:
        raise ValueError(f"kind must be one of {', '.join(SUBLAYERS)}, got {kind!r}")
    decoder = layers.decoder_layers(model)
    mlps = [tuple(layers._mlp_children(layer)) for layer in decoder]
    if kind == "mlp":
        found = mlps
    else:
        found = []
        for layer, middle, order, mlp in zip(decoder, layers.middles(model), _call_order(model), mlps, strict=True):
            before = order[: order.index(middle.reads)] if middle.reads in order else order
            named = dict(layer.named_children())
            candidates = [n for n in before if n not in mlp and not _is_norm(named[n]) and any(True for _ in named[n].parameters())]
            found.append(tuple(candidates[:1]))
    if missing := [i for i, names in enumerate(found) if not names]:
        raise ValueError(f"layers {missing} have no {kind} child to zero (children: "
                         f"{', '.join(n for n, _ in decoder[missing[0]].named_children())}): choose whole layers (unit='layers')")  # fmt: skip
    return found


def _zeros(output):
    """Zeros in place of a module's output: the tensor itself, or the first of a tuple (the rest kept)."""
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    return type(output)([torch.zeros_like(output[0]), *output[1:]])


def _identity(module, args, kwargs, output):
    hidden = layers.layer_input(args, kwargs)
    return type(output)([hidden, *output[1:]]) if isinstance(output, (tuple, list)) else hidden


@contextmanager
def removed(model, unit: str, indices, *, children: list[tuple[str, ...]] | None = None):
    """`model` with the `unit` of each layer in `indices` removed by forward hooks, inside a `with` block.

    Args:
        unit: "layers" (each layer returns its input), "attention" or "mlp" (the branch returns zeros).
        indices: the layers, any iterable of integers (empty: nothing removed).
        children: branch_children(model, unit), when the caller has found them already.
    """
    decoder = layers.decoder_layers(model)
    if unit == "layers":
        handles = [decoder[i].register_forward_hook(_identity, with_kwargs=True) for i in indices]
    else:
        children = branch_children(model, unit) if children is None else children
        zero = lambda module, args, output: _zeros(output)  # noqa: E731
        handles = [getattr(decoder[i], name).register_forward_hook(zero) for i in indices for name in children[i]]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
