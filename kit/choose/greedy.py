"""Greedy iterative removal (SLEB, Song et al. 2024): remove one unit at a time (a whole layer, an
attention branch or an MLP branch), each time the one whose removal, on top of those removed so far,
gives the smallest mean next-token loss on calibration texts.

Per batch the current pruned model's layer inputs are stored with their calls (kit.choose.replay);
the candidate at layer j re-runs only layer j (bypassed, or with its branch zeroed by a forward hook)
and the layers after it, from the stored input of layer j. With one batch the stored inputs are kept
across steps, those after the winner replaced by the states of its candidate run, run once more; with
several, one pass of the pruned model per batch and step stores them again. Memory: one batch's residual
stream at the L + 1 positions and the one state a candidate run is at, never a candidate's whole stream.
A candidate whose loss comes out inf or NaN (a half-precision overflow) never wins; if every one does,
the removal stops with advice."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import artifacts, distributed, layers
from ..core.device import model_device, require_finite
from ..core.progress import progress
from ..core.text import encode, too_short
from . import replay
from .branches import SUBLAYERS, UNITS, branch_children, removed, unit_set

_FORMAT = "kit.greedy/1"


@dataclass
class GreedyRemoval:
    """The units a greedy removal took, in order, and what each step cost.

    order: the layer index of the unit removed at each step. losses: the mean calibration loss (nats)
    after each step. candidates[s, j]: the loss with unit j removed on top of order[:s] (NaN where j was
    removed already). meta: unit, base_loss (the unpruned model's), model, n_texts, tokens, max_length,
    batch_size, num_layers, versions."""

    order: list[int]
    losses: np.ndarray
    candidates: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return self.meta["unit"]

    @property
    def num_layers(self) -> int:
        return self.candidates.shape[1]

    def first(self, n: int):
        """The set of the first n units removed: Layers, or Sublayers."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > len(self.order):
            raise ValueError(f"the greedy removal took {len(self.order)} steps; n={n} needs greedy_removal(..., steps={n}) or more")
        return unit_set(self.unit, self.order[:n])

    def save(self, path: str | Path) -> Path:
        """One safetensors file; `meta` goes into its header as JSON. Written atomically."""
        tensors = {"order": torch.tensor(self.order, dtype=torch.int64), "losses": torch.from_numpy(self.losses),
                   "candidates": torch.from_numpy(self.candidates)}  # fmt: skip
        return artifacts.save_tensors(path, tensors, format=_FORMAT, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "GreedyRemoval":
        not_it = f"{path} is not a GreedyRemoval file (saved by GreedyRemoval.save)"
        tensors, meta = artifacts.load_tensors(path, format=_FORMAT, not_it=not_it)
        return cls(tensors["order"].tolist(), tensors["losses"].numpy(), tensors["candidates"].numpy(), meta)


class _Batch:
    """One batch's scored positions and targets, the current pruned model's layer calls and residual
    stream at positions 0..L (`hidden[i]`: the input of layer i; a removed layer passes it on)."""

    def __init__(self, model, enc, unit: str, gone: list[int], children):
        self.scored = enc["attention_mask"][:, 1:].bool()  # position t predicts token t+1
        self.targets = enc["input_ids"][:, 1:][self.scored]
        with removed(model, unit, gone, children=children), replay.Inputs(model) as inputs:
            inputs.run(**enc, use_cache=False)
        self.calls = inputs.calls
        if len(self.calls) != layers.num_layers(model) or inputs.output is None:
            raise RuntimeError(f"captured the inputs of {len(self.calls)} layers, expected {layers.num_layers(model)}")
        self.hidden = [*(layers.layer_input(*call) for call in self.calls), inputs.output]


def _candidate(model, batch: _Batch, unit: str, j: int, gone: list[int], children, keep=None) -> torch.Tensor:
    """The residual stream after the last layer with unit j removed on top of `gone` (whose branches the
    caller keeps zeroed), from the stored input of layer j; `keep(i, state)` is given the states at
    positions j+1..L on the way."""
    decoder = layers.decoder_layers(model)
    if unit == "layers":
        hidden = batch.hidden[j]
    else:
        with removed(model, unit, [j], children=children):
            hidden = replay.run_layer(decoder[j], batch.calls[j], batch.hidden[j])
    for i in range(j + 1, len(decoder) + 1):
        if keep is not None:
            keep(i, hidden)
        if i < len(decoder) and not (unit == "layers" and i in gone):
            hidden = replay.run_layer(decoder[i], batch.calls[i], hidden)
    return hidden


def _winner(sums: torch.Tensor, left: list[int], model) -> int:
    """The candidate of least loss, the first on ties; inf and NaN (an overflow) never win."""
    losses = sums[left].numpy()
    finite = np.isfinite(losses)
    require_finite(bool(finite.any()), "the loss of every greedy candidate", model)
    return left[int(np.argmin(np.where(finite, losses, np.inf)))]


def _check(model, tokenizer, texts, unit: str, steps: int, batch_size: int, max_length: int) -> None:
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    L = layers.num_layers(model)
    most = L - 1 if unit == "layers" else L
    if not 1 <= steps <= most:
        raise ValueError(f"steps={steps} is out of range: choose 1 <= steps <= {most} for {unit} of {L} layers")
    if short := too_short(tokenizer, texts, max_length=max_length, min_tokens=2):
        raise ValueError(f"texts {short} have fewer than 2 tokens: nothing to predict; remove them")


@torch.no_grad()
def greedy_removal(
    model, tokenizer, texts: list[str], *, unit: str = "layers", steps: int, max_length: int = 512, batch_size: int = 8,
    model_name: str | None = None,
) -> GreedyRemoval:  # fmt: skip
    """Remove `steps` units of `model` one at a time, each the one whose removal costs the least loss.

    Args:
        texts: the calibration texts, each with at least two tokens (batched and truncated like validation_loss).
        unit: "layers" (whole layers), "attention" or "mlp" (one branch of a layer, zeroed).
        steps: how many units to remove (whole layers: at most L - 1).
        model_name: recorded in meta["model"] (default: model.name_or_path).
    Ties go to the lower layer index. Cost per step: each candidate re-runs the layers from its own on.
    Under torch.distributed each rank scores its share of the batches and the losses are summed over ranks.
    """
    _check(model, tokenizer, texts, unit, steps, batch_size, max_length)
    L = layers.num_layers(model)
    distributed.require_same("the greedy removal", dict(texts=distributed.digest(texts), unit=unit, steps=steps,
                                                        max_length=max_length, batch_size=batch_size))  # fmt: skip
    children = branch_children(model, unit) if unit in SUBLAYERS else None
    mine = distributed.shard(len(texts), batch_size)  # under torch.distributed: this rank's batches
    firsts = range(mine.start, mine.stop, batch_size)
    keep = len(firsts) == 1 and distributed.world_size() == 1  # one batch: its stored inputs stay, updated
    device, score = model_device(model), replay.head(model)
    gone, losses, candidates, base = [], [], np.full((steps, L), np.nan), None
    stored, was_training = None, model.training
    model.eval()
    try:
        for step in progress(range(steps), desc=f"greedy removal of {unit}", unit="step", show=distributed.is_main()):
            sums, count = torch.zeros(L + 1, dtype=torch.float64), 0  # sums[L]: the current model
            left = [j for j in range(L) if j not in gone]
            for first in firsts:
                if stored is None:
                    enc = encode(tokenizer, texts[first : first + batch_size], max_length=max_length, device=device)
                batch = stored if stored is not None else _Batch(model, enc, unit, gone, children)
                count += len(batch.targets)
                if step == 0:
                    sums[L] += replay.loss_sum(score, batch.hidden[L], batch.scored, batch.targets)
                with removed(model, unit, gone if unit in SUBLAYERS else [], children=children):
                    for j in left:
                        final = _candidate(model, batch, unit, j, gone, children)
                        sums[j] += replay.loss_sum(score, final, batch.scored, batch.targets)
                stored = batch if keep else None
            sums, count = distributed.all_sum(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])).split([L + 1, 1])
            winner = _winner(sums, left, model)
            mean = (sums / count).numpy()
            base = float(mean[L]) if step == 0 else base
            candidates[step, left] = mean[left]
            if keep:  # the winner's run again (the same arithmetic, the same states), stored in place
                with removed(model, unit, gone if unit in SUBLAYERS else [], children=children):
                    _candidate(model, stored, unit, winner, gone, children, keep=stored.hidden.__setitem__)
            gone.append(winner)
            losses.append(float(mean[winner]))
    finally:
        model.train(was_training)
    name = model_name or getattr(model, "name_or_path", None) or "unknown"
    meta = dict(unit=unit, base_loss=base, model=name, n_texts=len(texts), tokens=int(count.item()), max_length=max_length,
                batch_size=batch_size, num_layers=L, versions=artifacts.versions())  # fmt: skip
    return GreedyRemoval(gone, np.array(losses), candidates, meta)
