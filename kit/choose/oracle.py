"""The ablation oracle: the true validation loss, and the KL divergence from the unpruned model,
of removing each block of consecutive layers, measured without rebuilding any model.

Per batch one pass stores every layer's input (and the keyword arguments it was called with:
attention mask, rotary position embeddings, ...); block (start, n) re-runs only layers
start+n .. L-1 from the stored input of layer `start`, then the final norm and the LM head.
The values equal `validation_loss(drop_layers(model, block), ...)` on the same batches, to float rounding
(other shapes, other sums: 1e-5 relative in the tests).
`compare_criteria` judges the block-choosing criteria of kit.choose.criteria.CRITERIA against it."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..core import artifacts, distributed, layers
from ..core.block import Block
from ..core.device import model_device
from ..core.progress import progress
from ..core.text import encode, too_short
from . import replay
from .criteria import choose_block

_FORMAT = "kit.ablation/1"


@dataclass
class Ablation:
    """Mean next-token loss (nats) and KL(unpruned || pruned) of the model without each block.

    `loss[n, start]` and `kl[n, start]` are indexed like `Distances.by_block()`: shape (L+1, L+1),
    NaN where the block does not exist or was not measured; row 0 is the unpruned model.
    meta records how it was measured: model, n_texts, tokens, max_length, ns, versions."""

    loss: np.ndarray
    kl: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.loss, self.kl = (np.asarray(table, dtype=np.float64) for table in (self.loss, self.kl))
        shape = self.loss.shape
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2 or self.kl.shape != shape:
            raise ValueError(f"Ablation needs (L+1) x (L+1) loss and kl tables, got {shape} and {self.kl.shape}")

    @property
    def num_layers(self) -> int:
        return self.loss.shape[0] - 1

    @property
    def ns(self) -> list[int]:
        """The block sizes measured (rows with values), without 0."""
        return [n for n in range(1, self.num_layers + 1) if not np.isnan(self.loss[n]).all()]

    def best_block(self, n: int) -> Block:
        """The block of n layers whose removal costs the least loss (first one on ties); a block whose loss
        came out inf or NaN (a half-precision overflow) never wins."""
        Block(0, n).check(self.num_layers)
        if n not in self.ns:
            raise ValueError(f"block size n={n} was not measured; measured: {self.ns}. Pass it in ablation_losses(ns=...)")
        row = self.loss[n, : self.num_layers - n + 1]
        if not np.isfinite(row).any():
            raise FloatingPointError(f"the loss of every block of {n} layers came out inf or NaN: the model overflows in "
                                     "half precision; measure it again in float32 or bfloat16 (kit.load_model(..., dtype=...))")  # fmt: skip
        return Block(int(np.argmin(np.where(np.isfinite(row), row, np.inf))), n)

    def save(self, path: str | Path) -> Path:
        """One safetensors file; `meta` goes into its header as JSON. Written atomically."""
        tensors = {"loss": torch.from_numpy(self.loss), "kl": torch.from_numpy(self.kl)}
        return artifacts.save_tensors(path, tensors, format=_FORMAT, meta=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "Ablation":
        not_it = f"{path} is not an Ablation file (saved by Ablation.save / notebook 05_criteria)"
        tensors, meta = artifacts.load_tensors(path, format=_FORMAT, not_it=not_it)
        return cls(tensors["loss"].numpy(), tensors["kl"].numpy(), meta)


def _sizes(ns, num_layers: int) -> list[int]:
    sizes = list(range(1, num_layers)) if ns is None else sorted(set(ns))
    for n in sizes:
        Block(0, n).check(num_layers)
    if not sizes:
        raise ValueError("ns is empty: pass block sizes, e.g. ns=[1, 2, 4], or None for every size")
    return sizes


@torch.no_grad()
def ablation_losses(
    model, tokenizer, texts: list[str], *, ns=None, max_length: int = 512, batch_size: int = 8, model_name: str | None = None,
) -> Ablation:  # fmt: skip
    """Loss and KL to the unpruned model of `model` without each block of n layers, for n in `ns`.

    Args:
        texts: the texts scored, each with at least two tokens (batched and truncated like validation_loss).
        ns: block sizes to measure (default: every size 1 .. L-1); other rows stay NaN.
        model_name: recorded in meta["model"] (default: model.name_or_path).
    Memory: one batch's layer inputs and last-layer output, and one chunk of logits: the unpruned model's
    log-probs are computed again for each chunk, never kept for all tokens (2 GiB at a 128k vocabulary).
    Under torch.distributed each rank measures its share of the batches and every rank returns the sums of all.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    L = layers.num_layers(model)
    sizes = _sizes(ns, L)
    distributed.require_same("the ablation oracle", dict(texts=distributed.digest(texts), ns=sizes, max_length=max_length,
                                                          batch_size=batch_size))  # fmt: skip
    if short := too_short(tokenizer, texts, max_length=max_length, min_tokens=2):
        raise ValueError(f"texts {short} have fewer than 2 tokens: nothing to predict; remove them")
    blocks = [Block(start, n) for n in sizes for start in range(L - n + 1)]
    loss, kl = np.zeros((L + 1, L + 1)), np.zeros((L + 1, L + 1))
    count, device, head = 0, model_device(model), replay.head(model)
    decoder = layers.decoder_layers(model)
    mine = distributed.shard(len(texts), batch_size)  # under torch.distributed: this rank's batches
    was_training = model.training
    model.eval()
    try:
        batches = range(mine.start, mine.stop, batch_size)
        for first in progress(batches, desc="ablation oracle", unit="batch", show=distributed.is_main()):
            enc = encode(tokenizer, texts[first : first + batch_size], max_length=max_length, device=device)
            scored = enc["attention_mask"][:, 1:].bool()  # position t predicts token t+1
            targets = enc["input_ids"][:, 1:][scored]
            with replay.Inputs(model) as inputs:
                inputs.run(**enc, use_cache=False)
            calls = inputs.calls
            if len(calls) != L or inputs.output is None:
                raise RuntimeError(f"captured the inputs of {len(calls)} layers, expected {L}")
            unpruned = replay.scored_chunks(inputs.output, scored)  # the unpruned model's last states, chunked
            loss[0] += replay.loss_sum(head, inputs.output, scored, targets)
            for block in blocks:
                hidden = layers.layer_input(*calls[block.start])
                for index in range(block.end, L):
                    hidden = replay.run_layer(decoder[index], calls[index], hidden)
                done = 0
                for chunk, reference in zip(replay.scored_chunks(hidden, scored), unpruned):
                    logp, ref = head(chunk).log_softmax(-1), head(reference).log_softmax(-1)  # the head's device
                    target = targets[done : done + len(chunk)].to(logp.device)  # under a device_map: not the inputs'
                    loss[block.n, block.start] += F.nll_loss(logp, target, reduction="sum").item()
                    kl[block.n, block.start] += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
                    done += len(chunk)
            count += len(targets)
    finally:
        model.train(was_training)
    loss, kl, counts = distributed.all_sum(torch.from_numpy(np.stack([loss, kl, np.full_like(loss, count)]))).cpu().numpy()
    count = int(counts[0, 0])
    measured = np.full((L + 1, L + 1), False)
    measured[0] = True
    for block in blocks:
        measured[block.n, block.start] = True
    loss, kl = np.where(measured, loss / count, np.nan), np.where(measured, kl / count, np.nan)
    name = model_name or getattr(model, "name_or_path", None) or "unknown"
    meta = dict(
        model=name, n_texts=len(texts), tokens=count, max_length=max_length, batch_size=batch_size, ns=sizes,
        num_layers=L, versions=artifacts.versions(),
    )  # fmt: skip
    return Ablation(loss, kl, meta)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks on ties)."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def _check_same_model(tables: dict[str, object]) -> None:
    """Every table describes the same number of layers and, where recorded, the same model."""
    for key, what in (("num_layers", "layers"), ("model", "model")):
        found = {name: getattr(t, key) if key == "num_layers" else t.meta.get(key) for name, t in tables.items()}
        found = {name: value for name, value in found.items() if value is not None}
        if len(set(found.values())) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in found.items())
            raise ValueError(f"the tables come from different {what} ({listed}): measure them all on one model")


def compare_criteria(held_out: Ablation, *, distances=(), calibration: Ablation | None = None, ns=None) -> pd.DataFrame:
    """How well each criterion picks blocks, judged on held-out texts it did not choose on.

    Args:
        held_out: kit.choose.oracle.ablation_losses on held-out texts (the oracle the criteria are judged by).
        distances: scans (kit.Distances, one per metric); each is the criterion named by its metric.
        calibration: kit.choose.oracle.ablation_losses on calibration texts, for the "loss" criterion.
        ns: block sizes (default: every size measured on held_out).
    Returns one row per (n, criterion): start chosen, its held-out loss and kl, the held-out best
    start and loss, regret (loss - best loss, >= 0), and spearman: the rank correlation over starts
    between the criterion's scores (distances, calibration losses) and the held-out losses
    (NaN for the heuristic, which scores nothing).
    """
    scans = {scan.meta.get("metric", "similarity"): scan for scan in distances}
    tables = {"held_out": held_out, **({"calibration": calibration} if calibration is not None else {}), **scans}
    _check_same_model(tables)
    L = held_out.num_layers
    sizes = held_out.ns if ns is None else list(ns)
    if missing := sorted(set(sizes) - set(held_out.ns)):
        raise ValueError(f"block sizes {missing} were not measured on the held-out texts; measured: {held_out.ns}")
    scores = {metric: scan.by_block() for metric, scan in scans.items()}
    if calibration is not None:
        scores["loss"] = calibration.loss
    criteria = [*scans, "heuristic", *(["loss"] if calibration is not None else [])]
    rows = []
    for n in sizes:
        starts = np.arange(L - n + 1)
        truth = held_out.loss[n, starts]
        best = held_out.best_block(n)
        for name in criteria:
            block = choose_block(name, L, n, distances=scans, oracle=calibration)
            loss = held_out.loss[n, block.start]
            spearman = _spearman(scores[name][n, starts], truth) if name in scores else np.nan
            rows.append(dict(
                n=n, criterion=name, start=block.start, loss=loss, kl=held_out.kl[n, block.start],
                best_start=best.start, best_loss=held_out.loss[n, best.start], regret=loss - held_out.loss[n, best.start],
                spearman=spearman,
            ))  # fmt: skip
    return pd.DataFrame(rows)
