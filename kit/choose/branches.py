"""The units a set criterion removes, named one way for the whole kit.choose package, and removing them
from a model for a moment with forward hooks: a whole layer returns its input, an attention (or mixer)
or MLP branch returns zeros, so its contribution to the residual stream is zero (DESIGN.md, "Units
other than a block"). Nothing is copied or edited; the hooks go on exit."""

from contextlib import contextmanager

import torch

from ..core import layers
from ..core.block import SUBLAYER_KINDS as SUBLAYERS
from ..core.block import Layers, Sublayers

UNITS = ("layers", *SUBLAYERS)  # what a set criterion removes: whole layers, or one branch of each layer


def unit_set(unit: str, indices) -> Layers | Sublayers:
    """A chosen set of units: Layers for whole layers, Sublayers for attention or MLP sublayers.

    Args:
        unit: one of UNITS.
        indices: the layers whose unit is removed, any iterable of integers.
    """
    if unit == "layers":
        return Layers(indices)
    if unit not in SUBLAYERS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return Sublayers(unit, indices)


def branch_children(model, kind: str) -> list[tuple[str, ...]]:
    """For each decoder layer, the names of the children whose outputs make its `kind` branch: what
    kit.core.layers.middles found (Middle.attention, Middle.mlp), the children kit.prune removes.

    Raises ValueError for a kind other than "attention" or "mlp"; middles raises UnsupportedArchitectureError
    for a layer without sublayers."""
    if kind not in SUBLAYERS:
        raise ValueError(f"kind must be one of {', '.join(SUBLAYERS)}, got {kind!r}")
    return [(middle.attention,) if kind == "attention" else middle.mlp for middle in layers.middles(model)]


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
