"""Layer similarity: one streaming pass measures the distance between every pair of
residual-stream positions 0..L, which scores every block of consecutive layers at once.

Position i < L is the input of decoder layer i; position L is the output of the last layer,
before the final norm. Block (start, n) removes layers start..start+n-1 and is scored by
`matrix[start, start + n]` (Gromov et al. 2024, eq. 4)."""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import artifacts, layers
from .data import encode
from .device import model_device, provenance, require_finite
from .prune import Block

METRICS = {
    "angular_last": "arccos(cos) / pi on the last non-pad token of each text (the paper)",
    "angular_all": "arccos(cos) / pi averaged over all non-pad tokens",
    "block_influence": "ShortGPT's Block Influence, 1 - cos averaged over all non-pad tokens",
}
_FORMAT = "kit.distances/1"
_TOKEN_CHUNK = 1024  # tokens per pairwise-cosine chunk: bounds the [tokens, L+1, L+1] buffers


@dataclass
class Distances:
    """Mean distance between residual-stream positions: `matrix[i, j]`, i, j in 0..L.

    meta records how it was measured: model, n_texts, tokens, max_length, metric, versions."""

    matrix: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.matrix = torch.as_tensor(self.matrix, dtype=torch.float32).cpu()
        if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1] or self.matrix.shape[0] < 2:
            raise ValueError(f"Distances needs a square (L+1) x (L+1) matrix with L >= 1, got shape {tuple(self.matrix.shape)}")

    @property
    def num_layers(self) -> int:
        return self.matrix.shape[0] - 1

    def by_block(self) -> np.ndarray:
        """table[n, start] = distance of block (start, n) = matrix[start, start + n].

        Shape (L+1, L+1), indexed directly by n and start: NaN where start + n > L; row 0 is 0."""
        L = self.num_layers
        matrix = self.matrix.numpy()
        table = np.full((L + 1, L + 1), np.nan, dtype=np.float32)
        for n in range(L + 1):
            table[n, : L + 1 - n] = np.diagonal(matrix, offset=n)
        return table

    def best_block(self, n: int) -> Block:
        """The block of n layers whose input and output are closest (first one on ties)."""
        Block(0, n).check(self.num_layers)
        row = np.diagonal(self.matrix.numpy(), offset=n)
        start = int(np.argmin(row))
        return Block(start, n, float(row[start]))

    def save(self, path: str | Path) -> Path:
        """One safetensors file; `meta` goes into its header as JSON. Written atomically."""
        with artifacts.atomic_path(path) as tmp:
            metadata = {"format": _FORMAT, "meta": json.dumps(self.meta, default=str)}
            save_file({"matrix": self.matrix.contiguous()}, tmp, metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Distances":
        with safe_open(artifacts.require(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a Distances file (saved by Distances.save / notebook 01_similarity)")
            return cls(f.get_tensor("matrix"), json.loads(metadata["meta"]))


class _EndOfLayers(Exception):
    """Raised after the last decoder layer: the final norm and LM head are not needed."""


class _Residuals:
    """Forward hooks that keep the residual stream at positions 0..L for the selected tokens
    (float32, on one device), then stop the forward pass."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.layers = layers.decoder_layers(model)
        self.select, self.states, self.handles = None, [], []

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._on_input, with_kwargs=True))
        self.handles.append(self.layers[-1].register_forward_hook(self._on_output))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _keep(self, hidden: torch.Tensor):
        self.states.append(hidden[self.select.to(hidden.device)].to(self.device, torch.float32))

    def _on_input(self, module, args, kwargs):
        self._keep(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _on_output(self, module, args, output):
        self._keep(output[0] if isinstance(output, tuple) else output)
        raise _EndOfLayers

    def __call__(self, enc, select: torch.Tensor) -> list[torch.Tensor]:
        """States at positions 0..L of the `select`ed tokens ([batch, seq] bool): L+1 x [tokens, hidden]."""
        self.select, self.states = select, []
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # same under left and right padding
        try:
            self.model(**enc, position_ids=positions, use_cache=False)
        except _EndOfLayers:
            pass
        if len(self.states) != len(self.layers) + 1:
            raise RuntimeError(f"captured {len(self.states)} residual positions, expected {len(self.layers) + 1}")
        return self.states


def _pair_sums(states: list[torch.Tensor], metric: str) -> torch.Tensor:
    """Sum over tokens of the distance between every pair of positions ([L+1, L+1], float64)."""
    total = torch.zeros(len(states), len(states), dtype=torch.float64, device=states[0].device)
    for start in range(0, len(states[0]), _TOKEN_CHUNK):
        chunk = torch.stack([state[start : start + _TOKEN_CHUNK] for state in states])
        unit = F.normalize(chunk.double(), dim=-1)
        cos = torch.einsum("ptd,qtd->tpq", unit, unit).clamp_(-1.0, 1.0)
        total += (1.0 - cos if metric == "block_influence" else torch.arccos(cos) / math.pi).sum(0)
    return total


def _select(mask: torch.Tensor, metric: str) -> torch.Tensor:
    """Tokens the metric compares: the last non-pad token of each row, or every non-pad token."""
    if metric != "angular_last":
        return mask.bool()
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return F.one_hot(last, mask.shape[1]).bool()


def _fingerprint(texts, settings: dict) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(f"{len(text)}:{text}".encode())
    return hashlib.sha256(json.dumps({**settings, "texts": digest.hexdigest()}, sort_keys=True).encode()).hexdigest()[:16]


def _resume(cache_path, fingerprint: str, settings: dict, size: int):
    """(sums, count, batches done) from the cache, or a fresh start."""
    if cache_path is None or not Path(cache_path).exists():
        return torch.zeros(size, size, dtype=torch.float64), 0, 0
    with safe_open(cache_path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            cached = json.loads(meta.get("settings", "{}"))
            changed = [f"{k}: {cached.get(k)!r} -> {v!r}" for k, v in settings.items() if cached.get(k) != v]
            raise ValueError(
                f"{cache_path} holds a scan made with other settings ({'; '.join(changed) or 'other texts'}). "
                "Delete it, or pass another cache_path, or load the model as before."
            )
        return f.get_tensor("sums"), int(meta["count"]), int(meta["batches"])


def _checkpoint(cache_path, fingerprint: str, settings: dict, sums: torch.Tensor, count: int, batches: int):
    with artifacts.atomic_path(cache_path) as tmp:
        meta = {"fingerprint": fingerprint, "settings": json.dumps(settings), "count": str(count), "batches": str(batches)}
        save_file({"sums": sums.cpu()}, tmp, metadata=meta)


@torch.no_grad()
def angular_distances(
    model, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 512,
    metric: str = "angular_last", cache_path: str | Path | None = None, model_name: str | None = None,
) -> Distances:  # fmt: skip
    """Distances between all residual-stream positions of `model`, averaged over `texts`.

    metric: one of METRICS; "angular_last" is the paper's. All-token metrics are means over
    every non-pad token of the set. Memory does not grow with len(texts): only running sums
    are kept. Padding follows `tokenizer.padding_side`; left and right give the same result.
    cache_path: progress is saved there after every batch; a rerun resumes from it.
    model_name: recorded in meta["model"] (default: model.name_or_path).
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name = model_name or getattr(model, "name_or_path", None) or "unknown"
    size = layers.num_layers(model) + 1
    placement = provenance(model)
    settings = dict(
        model=name, positions=size, metric=metric, batch_size=batch_size, max_length=max_length,
        padding_side=tokenizer.padding_side, device=placement["device"], gpu=placement["gpu"],
        dtype=placement["dtype"], quantization=placement["quantization"],
    )  # fmt: skip
    fingerprint = _fingerprint(texts, settings)
    sums, count, done = _resume(cache_path, fingerprint, settings, size)
    device = model_device(model)
    sums = sums.to(device)
    starts = range(0, len(texts), batch_size)
    was_training = model.training
    model.eval()
    try:
        with _Residuals(model, device) as residuals:
            for index in tqdm(
                range(done, len(starts)), initial=done, total=len(starts), desc=f"similarity scan ({metric})", unit="batch"
            ):
                batch = texts[starts[index] : starts[index] + batch_size]
                enc = encode(tokenizer, batch, max_length=max_length, device=device, padding_side=tokenizer.padding_side)
                empty = (enc["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"texts {[starts[index] + i for i in empty]} have no tokens; remove empty texts")
                select = _select(enc["attention_mask"], metric)
                sums += _pair_sums(residuals(enc, select), metric)
                require_finite(bool(torch.isfinite(sums).all()), f"the scan's distances (batch {index})", model)
                count += int(select.sum())
                if cache_path is not None:
                    _checkpoint(cache_path, fingerprint, settings, sums, count, index + 1)
    finally:
        model.train(was_training)
    matrix = (sums + sums.T).cpu() / (2 * count)
    matrix.fill_diagonal_(0.0)
    meta = dict(
        model=name, n_texts=len(texts), tokens=count, max_length=max_length, metric=metric,
        num_layers=size - 1, placement=placement, versions=artifacts.versions(),
    )  # fmt: skip
    return Distances(matrix.float(), meta)
