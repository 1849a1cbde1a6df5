"""A block of consecutive decoder layers: what the method removes. Imports nothing else from the kit."""

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


def heuristic_block(num_layers: int, n: int) -> Block:
    """The paper's heuristic criterion: keep the final layer, drop the n layers before it."""
    return Block(num_layers - 1 - n, n).check(num_layers)
