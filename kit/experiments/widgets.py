"""An interactive block picker for notebooks: sliders for the block size n and its first layer,
the distance heatmap with the chosen block boxed, and the chosen block's distance beside the
paper's heuristic block. It never waits for input: headless (papermill, scripts) it simply keeps
its default choice, and `plot()` draws the same picture as a static figure."""

import io

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..choose.criteria import CRITERIA, Selection, choose_block
from ..core.block import Block, heuristic_block
from .plots import distance_heatmap


class BlockPicker:
    """Choose the block to prune from a scan's `Distances`.

    n: the block size to begin with; start: its first layer (None: the criterion's block).
    criterion: a name in kit.choose.criteria.CRITERIA: "similarity" follows `distances.best_block(n)`
    (the argmin), "heuristic" the paper's heuristic block (keep the final layer, drop the n before
    it), "loss" the argmin of `oracle` (kit.choose.oracle.ablation_losses). Changing n moves start to the
    criterion's block for the new n; moving start elsewhere by hand makes the choice "manual".
    Display the picker as the last expression of a cell; `.block` and `.selection()` read it.
    """

    def __init__(self, distances, n: int, start: int | None = None, *, criterion: str = "similarity", oracle=None):
        choices = [name for name, rule in CRITERIA.items() if name != "manual" and rule.unit == "block"]
        if criterion not in choices:
            raise ValueError(f"criterion must be one of {', '.join(choices)}, not {criterion!r}")
        self.distances, self.criterion, self.oracle = distances, criterion, oracle
        L = distances.num_layers
        default = self._default(n)  # checks n
        start = default.start if start is None else Block(start, n).check(L).start
        self._n = widgets.IntSlider(n, min=1, max=L - 1, description="n (layers)", continuous_update=False)
        self._start = widgets.IntSlider(start, min=0, max=L - n, description="start", continuous_update=False)
        self._info = widgets.HTML()
        self._image = widgets.Image(format="png")
        self.widget = widgets.VBox([widgets.HBox([self._n, self._start]), self._info, self._image])
        self.widget.add_class("kit-block-picker")  # a stable handle for styling and browser tests
        self._moving = False
        self._n.observe(self._on_n, names="value")
        self._start.observe(self._refresh, names="value")
        self._refresh()

    def _default(self, n: int) -> Block:
        block = choose_block(self.criterion, self.distances.num_layers, n, distances=self.distances, oracle=self.oracle)
        return self._scored(block)

    def _scored(self, block: Block) -> Block:
        return Block(block.start, block.n, float(self.distances.matrix[block.start, block.end]))

    @property
    def block(self) -> Block:
        """The chosen block, with its distance."""
        return self._scored(Block(self._start.value, self._n.value))

    @property
    def source(self) -> str:
        """How the block was chosen: the criterion's name, or "manual" (start moved by hand)."""
        return self.criterion if self._start.value == self._default(self._n.value).start else "manual"

    def selection(self) -> Selection:
        """The choice, as notebook 02 saves it in selection.json (Selection.save)."""
        block = self.block
        return Selection(block.start, block.n, block.distance, self.source, self.distances.meta.get("model"))

    def plot(self, ax=None):
        """The heatmap with the chosen block boxed and the heuristic block crossed; returns the Axes."""
        block = self.block
        ax = distance_heatmap(self.distances, highlight=block, ax=ax)
        heuristic = heuristic_block(self.distances.num_layers, block.n)
        ax.plot(heuristic.start, block.n, "X", ms=10, mfc="white", mec="black", label="heuristic block")
        ax.legend(loc="upper right", fontsize="small")
        return ax

    def _summary(self) -> str:
        block, n = self.block, self._n.value
        best, heuristic = self.distances.best_block(n), self._scored(heuristic_block(self.distances.num_layers, n))
        rows = [
            (f"chosen ({self.source})", block),
            ("similarity (smallest distance)", best),
            ("heuristic (keep the final layer)", heuristic),
        ]
        cells = "".join(
            f"<tr><td>{name}</td><td>layers {b.start}&ndash;{b.end - 1}</td><td>distance {b.distance:.4f}</td></tr>"
            for name, b in rows
        )
        return f"<table>{cells}</table>"

    def _on_n(self, change):
        n = change["new"]
        self._moving = True  # one redraw, not one per slider update
        try:
            self._start.max = self.distances.num_layers - n
            self._start.value = self._default(n).start
        finally:
            self._moving = False
        self._refresh()

    def _refresh(self, change=None):
        if self._moving:
            return
        self._info.value = self._summary()
        figure = Figure(figsize=(7, 5))
        self.plot(ax=figure.subplots())
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=80, bbox_inches="tight")
        self._image.value = png.getvalue()

    def __repr__(self) -> str:
        block = self.block
        return (
            f"BlockPicker: layers {block.start}-{block.end - 1} (n={block.n}, start={block.start}, {self.source}), "
            f"distance {block.distance:.4f}"
        )

    def _repr_mimebundle_(self, **kwargs):
        """The widget in a live notebook; a one-line summary where widgets do not render."""
        return {**self.widget._repr_mimebundle_(**kwargs), "text/plain": repr(self)}
