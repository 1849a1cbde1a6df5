"""What the method removes: a block of consecutive decoder layers, any set of whole layers, or the
attention or MLP sublayers of a set of layers. Imports nothing else from the kit."""

import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """Layers start .. start+n-1 (n consecutive layers), with their distance (and its standard error
    over the calibration texts) when a scan chose them."""

    start: int
    n: int
    distance: float | None = None
    stderr: float | None = None

    @property
    def end(self) -> int:
        """One past the last removed layer: the residual position the block's input is compared to."""
        return self.start + self.n

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    @property
    def label(self) -> str:
        """The layers in words, for messages: "layers 2..4" ("layer 2" for one)."""
        return Layers(self.layers).label

    def check(self, num_layers: int) -> "Block":
        """This block, or a ValueError giving the valid range for a model of `num_layers` layers."""
        if not 0 < self.n < num_layers:
            raise ValueError(f"Block size n={self.n} is out of range: choose 1 <= n <= {num_layers - 1} for {num_layers} layers.")
        if not 0 <= self.start <= num_layers - self.n:
            raise ValueError(
                f"Block start={self.start} is out of range for n={self.n}: choose 0 <= start <= {num_layers - self.n} "
                f"for {num_layers} layers."
            )
        return self


def _check_indices(indices: tuple[int, ...], num_layers: int, what: str) -> None:
    """A ValueError unless `indices` name at least one layer and each is in 0 .. num_layers-1."""
    if not indices:
        raise ValueError(f"No {what} to remove: name at least one of the layers 0 <= i <= {num_layers - 1}.")
    outside = [i for i in indices if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"Layer indices {outside} are out of range: choose 0 <= i <= {num_layers - 1} for {num_layers} layers.")


@dataclass(frozen=True)
class Layers:
    """Any set of whole decoder layers, by index, consecutive or not: `Layers({0, 2, 5})`. The indices are
    kept sorted (`layers`); naming one twice is a ValueError. A Block is the contiguous case.

    Args:
        indices: the layer indices, any iterable of integers.
    """

    indices: tuple[int, ...]

    def __post_init__(self):
        given = [operator.index(i) for i in self.indices]
        twice = sorted(i for i, count in Counter(given).items() if count > 1)
        if twice:
            raise ValueError(f"Layers {twice} are named more than once in {given}: name each layer once.")
        object.__setattr__(self, "indices", tuple(sorted(given)))

    @property
    def layers(self) -> tuple[int, ...]:
        return self.indices

    @property
    def blocks(self) -> list[Block]:
        """The indices as maximal runs of consecutive layers, in order: Layers({0, 2, 3}) -> Block(0, 1), Block(2, 2)."""
        runs: list[Block] = []
        for i in self.indices:
            if runs and runs[-1].end == i:
                runs[-1] = Block(runs[-1].start, runs[-1].n + 1)
            else:
                runs.append(Block(i, 1))
        return runs

    @property
    def label(self) -> str:
        """The layers in words, for messages, run by run: "layers 0, 2..3"."""
        runs = [f"{b.start}..{b.end - 1}" if b.n > 1 else str(b.start) for b in self.blocks]
        return f"layer{'s' if len(self.indices) > 1 else ''} {', '.join(runs)}"

    def check(self, num_layers: int) -> "Layers":
        """These layers, or a ValueError saying what a model of `num_layers` layers allows: at least one
        layer, every index in 0 .. num_layers-1, and not all of them."""
        _check_indices(self.indices, num_layers, "layers")
        if len(self.indices) == num_layers:
            raise ValueError(f"Removing all {num_layers} layers leaves no model: remove at most {num_layers - 1}.")
        return self


SUBLAYER_KINDS = ("attention", "mlp")  # a layer's token mixer (attention, Mamba, linear attention) and its MLP


@dataclass(frozen=True)
class Sublayers:
    """The attention (token mixer: attention, Mamba, linear attention) or MLP sublayers of a set of decoder
    layers, by layer index: `Sublayers("attention", {0, 2, 5})`. The indices are kept sorted; naming one
    twice is a ValueError. Every sublayer of a kind may go (the layers' other branches stay).

    Args:
        kind: "attention" or "mlp".
        indices: the layer indices, any iterable of integers.
    """

    kind: str
    indices: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in SUBLAYER_KINDS:
            raise ValueError(f"Unknown sublayer kind {self.kind!r}: choose one of {', '.join(map(repr, SUBLAYER_KINDS))}.")
        object.__setattr__(self, "indices", Layers(self.indices).indices)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.indices

    @property
    def label(self) -> str:
        """The sublayers in words, for messages: "attention of layers 0, 2..3"."""
        return f"{self.kind} of {Layers(self.indices).label}"

    def check(self, num_layers: int) -> "Sublayers":
        """These sublayers, or a ValueError saying what a model of `num_layers` layers allows: at least
        one layer, every index in 0 .. num_layers-1."""
        _check_indices(self.indices, num_layers, f"{self.kind} sublayers")
        return self


Removal = Block | Layers | Iterable[int]  # the layers to remove: a Block, Layers, or any iterable of layer indices


def as_layers(selection: Removal) -> Block | Layers:
    """The layers `selection` names: a Block or Layers as it is, any other iterable of layer indices (a set,
    a list) as Layers."""
    return selection if isinstance(selection, (Block, Layers)) else Layers(selection)


def heuristic_block(num_layers: int, n: int) -> Block:
    """The paper's heuristic criterion: keep the final layer, drop the n layers before it."""
    return Block(num_layers - 1 - n, n).check(num_layers)
