"""Layer similarity: one streaming pass measures the distance between every pair of
residual-stream positions 0..L, which scores every block of consecutive layers at once.

Position i < L is the input of decoder layer i; position L is the output of the last layer,
before the final norm. Block (start, n) removes layers start..start+n-1 and is scored by
`matrix[start, start + n]` (Gromov et al. 2024, eq. 4). A sublayer scan also keeps each layer's
middle (kit.core.layers.Middle: the residual stream after its attention branch, before its MLP
branch), 2L + 1 positions x_0, m_0, x_1, ..., m_{L-1}, x_L, which score each attention and MLP
sublayer too (Distances.sublayers)."""

import glob
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..core import artifacts, distributed, layers
from ..core.config import ScanConfig
from ..core.device import free_bytes, model_device, provenance, require_finite
from ..core.progress import progress
from ..core.sums import HIDDEN_SLICE, SCAN_TOKENS, chunk_size, sum_by
from ..core.text import encode, too_short
from .distances import Distances

METRICS = {
    "angular_last": "arccos(cos) / pi on the last non-pad token of each text (the paper)",
    "angular_all": "arccos(cos) / pi averaged over all non-pad tokens",
    "block_influence": "ShortGPT's Block Influence, 1 - cos averaged over all non-pad tokens",
}
_TOKEN_CHUNK = SCAN_TOKENS  # tokens per pairwise-cosine chunk: bounds the [tokens, L+1, L+1] buffers
_HIDDEN_SLICE = HIDDEN_SLICE  # hidden features per float64 copy in the cosines' Gram matrix
GROUPS = 32  # texts are dealt round-robin into this many groups (at most one per text) for resampling


class _Residuals(layers.LayerTap):
    """Keeps the residual stream at positions 0..L (with `middles`, each layer's middle too: 2L + 1
    positions) for the selected tokens (in the model's dtype, on one device: a bf16 model's states take half
    the memory fp32 copies would, and become fp32 exactly, a chunk at a time), then stops the forward pass."""

    def __init__(self, model, device, middles: list[layers.Middle] | None = None):
        super().__init__(model)
        self.device, self.middles, self.select, self.states = device, middles, None, []
        self.shape, self.pending = None, None  # the layer's input shape; a parallel layer's MLP outputs

    def __enter__(self):
        for layer, middle in zip(self.layers, self.middles or []):
            if middle.reads:
                keep = lambda module, args, kwargs: self._keep(layers.layer_input(args, kwargs).reshape(self.shape))  # noqa: E731
                self.handles.append(getattr(layer, middle.reads).register_forward_pre_hook(keep, with_kwargs=True))
            for name in middle.subtracts:
                self.handles.append(getattr(layer, name).register_forward_hook(self._subtract))
        return super().__enter__()

    def _selected(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[self.select.to(hidden.device)].to(self.device)

    def _subtract(self, module, args, output):
        mlp = self._selected(layers.layer_output(output).reshape(self.shape)).float()
        self.pending = mlp if self.pending is None else self.pending + mlp

    def _keep(self, hidden: torch.Tensor):
        state = self._selected(hidden)
        if self.pending is not None:  # a parallel layer's middle: its output (this state) less its MLP's
            self.states.append(state.float() - self.pending)  # in fp32: a difference the model never rounded
            self.pending = None
        self.states.append(state)

    def on_input(self, args, kwargs):
        hidden = layers.layer_input(args, kwargs)
        self.shape = hidden.shape
        self._keep(hidden)

    def on_output(self, hidden):
        self._keep(hidden)

    def __call__(self, enc, select: torch.Tensor) -> list[torch.Tensor]:
        """States at every position of the `select`ed tokens ([batch, seq] bool): positions x [tokens, hidden]."""
        self.select, self.states = select, []
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # same under left and right padding
        self.run(**enc, position_ids=positions, use_cache=False)
        expected = len(self.layers) * (2 if self.middles else 1) + 1
        if len(self.states) != expected:
            raise RuntimeError(f"captured {len(self.states)} residual positions, expected {expected}")
        return self.states


def _pair_sums(states: list[torch.Tensor], metric: str, text_of_token: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Per text, the sum over its tokens of the distance between every pair of positions
    ([texts, L+1, L+1], float64); text_of_token gives each selected token's row in the batch."""
    total = torch.zeros(n_texts, len(states), len(states), dtype=torch.float64, device=states[0].device)
    tokens, hidden = states[0].shape
    step = chunk_size(_chunk_tokens(len(states), hidden, states[0].device), tokens, len(states), hidden)
    for start in range(0, len(states[0]), step):
        cos = _cosines(torch.stack([state[start : start + step].float() for state in states], dim=1))
        distance = 1.0 - cos if metric == "block_influence" else torch.arccos(cos) / math.pi
        total += sum_by(text_of_token[start : start + step], distance, n_texts)
    return total


def _cosines(stack: torch.Tensor) -> torch.Tensor:
    """Cosines between every pair of positions of each token ([tokens, positions, hidden] float32 ->
    [tokens, positions, positions] float64). The Gram matrix is accumulated in float64 over slices of
    the hidden size, then divided by its diagonal's norms: only one slice is ever copied to float64,
    and near-parallel states keep their small angles (cosines of fp32 unit vectors are off by 1e-7,
    which arccos turns into 1e-4 of distance: the diagonal's 3e-4). A position's cosine with itself is
    1 exactly: rounded to 1 - 1e-16, arccos would turn it into a distance of about 7e-9 that depends on
    how the sums were blocked."""
    gram = torch.zeros(*stack.shape[:2], stack.shape[1], dtype=torch.float64, device=stack.device)
    for piece in stack.split(chunk_size(_HIDDEN_SLICE, stack.shape[-1], stack.shape[1]), dim=-1):
        piece = piece.double()
        gram.baddbmm_(piece, piece.transpose(1, 2))
    norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp(min=torch.finfo(torch.float64).tiny)
    cos = (gram / norms[:, :, None] / norms[:, None, :]).clamp_(-1.0, 1.0)
    cos.diagonal(dim1=1, dim2=2).fill_(1.0)
    return cos


def _chunk_tokens(positions: int, hidden: int, device: torch.device) -> int:
    """Tokens per pairwise-cosine chunk: _TOKEN_CHUNK, fewer where a chunk's buffers (the fp32 stack of
    [tokens, positions, hidden], one fp64 slice of it, fp64 [tokens, positions, positions] Gram matrix,
    cosines and distances) would take more than a quarter of the GPU's free memory (kit.core.device.free_bytes,
    which counts PyTorch's cached blocks as free; 0.7 GiB at 1,024 tokens, 33 positions and hidden 4,096)."""
    if device.type != "cuda":
        return _TOKEN_CHUNK
    free = free_bytes(device)
    per_token = positions * (hidden * 4 + min(hidden, _HIDDEN_SLICE) * 8) + 3 * positions**2 * 8
    return max(1, min(_TOKEN_CHUNK, free // 4 // per_token))


class _Sums:
    """The scan's running sums: per group of texts (dealt round-robin), the distance sums and token
    counts; over all texts, the sums of squares and cross products the standard errors need."""

    def __init__(self, groups: int, size: int, device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.tensors = {
            "group_sums": zeros(groups, size, size), "group_counts": zeros(groups),
            "squares": zeros(size, size), "cross": zeros(size, size), "count_squares": zeros(()),
        }  # fmt: skip

    def add(self, first_text: int, sums: torch.Tensor, counts: torch.Tensor):
        """Texts first_text, first_text + 1, ...: their distance sums [texts, L+1, L+1] and token counts."""
        t = self.tensors
        group = torch.arange(first_text, first_text + len(counts), device=counts.device) % len(t["group_counts"])
        t["group_sums"] += sum_by(group, sums, len(t["group_counts"]))
        t["group_counts"] += sum_by(group, counts, len(t["group_counts"]))
        t["squares"] += torch.einsum("tpq,tpq->pq", sums, sums)
        t["cross"] += torch.einsum("tpq,t->pq", sums, counts)
        t["count_squares"] += counts @ counts

    def distances(self, n_texts: int, meta: dict) -> Distances:
        """Mean distances, their standard errors over texts (delta method for token-weighted means:
        with per-text sums s, counts c and mean R, se^2 = m / (m - 1) * sum((s - R c)^2) / C^2)."""
        t = {key: value.cpu() for key, value in self.tensors.items()}
        symmetric = lambda x: (x + x.T) / 2  # noqa: E731
        total, count = symmetric(t["group_sums"].sum(0)), t["group_counts"].sum()
        matrix = (total / count).fill_diagonal_(0.0)
        if n_texts < 2:
            warnings.warn("one calibration text: the distances' standard errors are NaN", stacklevel=3)
            stderr = torch.full_like(matrix, math.nan)
        else:
            spread = symmetric(t["squares"]) - 2 * matrix * symmetric(t["cross"]) + matrix**2 * t["count_squares"]
            stderr = (n_texts / (n_texts - 1) * spread.clamp(min=0)).sqrt() / count
        stderr.fill_diagonal_(0.0)
        return Distances(matrix, meta, stderr, t["group_sums"], t["group_counts"])


def _select(mask: torch.Tensor, metric: str) -> torch.Tensor:
    """Tokens the metric compares: the last non-pad token of each row, or every non-pad token."""
    if metric != "angular_last":
        return mask.bool()
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return F.one_hot(last, mask.shape[1]).bool()


def _fingerprint(texts, settings: dict) -> str:
    return hashlib.sha256(json.dumps({**settings, "texts": distributed.digest(texts)}, sort_keys=True).encode()).hexdigest()[:16]


def _cache_file(cache_path, settings: dict) -> Path | None:
    """This rank's resume cache: `cache_path` itself in one process, else one file per rank beside it."""
    if cache_path is None or settings["world_size"] == 1:
        return cache_path and Path(cache_path)
    path = Path(cache_path)
    return path.with_name(f"{path.stem}.rank{settings['rank']}{path.suffix}")


def _resume(cache_path, fingerprint: str, settings: dict, sums: _Sums) -> int:
    """Batches of this rank done: the cache's sums are loaded into `sums`, or none when starting afresh."""
    path, world = _cache_file(cache_path, settings), settings["world_size"]
    if path is None:
        return 0
    split = sorted(path.parent.glob(f"{glob.escape(path.stem)}.rank*{path.suffix}")) if world == 1 else []
    if world > 1 and Path(cache_path).exists() or split:
        raise ValueError(
            f"{split[0] if split else cache_path} holds a scan made by {'several processes' if split else 'one process'}, "
            f"this one runs on {world}: resume it with the same number of processes, or delete it (and its "
            f"{Path(cache_path).stem}.rank* siblings)."
        )
    if not path.exists():
        return 0
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            cached = json.loads(meta.get("settings", "{}"))
            changed = [f"{k}: {cached.get(k)!r} -> {v!r}" for k, v in settings.items() if cached.get(k) != v]
            raise ValueError(
                f"{path} holds a scan made with other settings ({'; '.join(changed) or 'other texts'}). "
                "Delete it, or pass another cache_path, or load the model (and launch the processes) as before."
            )
        for key, value in sums.tensors.items():
            value.copy_(f.get_tensor(key))
        return int(meta["batches"])


def _checkpoint(cache_path, fingerprint: str, settings: dict, sums: _Sums, batches: int):
    with artifacts.atomic_path(_cache_file(cache_path, settings)) as tmp:
        tensors = {key: value.cpu().contiguous() for key, value in sums.tensors.items()}
        meta = {"fingerprint": fingerprint, "settings": json.dumps(settings), "batches": str(batches)}
        save_file(tensors, tmp, metadata=meta)


@torch.no_grad()
def angular_distances(
    model, tokenizer, texts: list[str], config: ScanConfig | None = None, *, cache_path: str | Path | None = None,
    **settings,
) -> Distances:  # fmt: skip
    """Distances between all residual-stream positions of `model`, averaged over `texts`.

    Memory does not grow with len(texts): only running sums are kept. Padding follows
    `tokenizer.padding_side`; left and right give the same result.

    Args:
        config: the scan's settings (ScanConfig): metric (one of METRICS; "angular_last" is the
            paper's; all-token metrics are means over every non-pad token), batch_size, max_length,
            model_name (recorded in meta["model"]; default model.name_or_path), groups (texts are
            dealt round-robin into this many groups, resampled by Distances.stability), sublayers
            (also each layer's middle: 2L + 1 positions, meta["positions"] "sublayers").
        cache_path: progress is saved there after every batch; a rerun resumes from it.
        **settings: ScanConfig fields overriding `config`, e.g. metric="angular_all".
    """
    config = (config or ScanConfig()).replace(**settings)
    metric, batch_size, max_length, model_name = config.metric, config.batch_size, config.max_length, config.model_name
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    groups = min(GROUPS, len(texts)) if config.groups is None else config.groups
    if not 1 <= groups <= len(texts):
        raise ValueError(f"groups must be between 1 and the number of texts ({len(texts)}), got {groups}")
    name = model_name or getattr(model, "name_or_path", None) or "unknown"
    middles = layers.middles(model) if config.sublayers else None
    size = layers.num_layers(model) * (2 if middles else 1) + 1
    placement = provenance(model)
    settings = dict(
        model=name, positions=size, metric=metric, batch_size=batch_size, max_length=max_length,
        padding_side=tokenizer.padding_side, groups=groups, device=placement["device"], gpu=placement["gpu"],
        dtype=placement["dtype"], quantization=placement["quantization"],
    )  # fmt: skip
    if middles:  # only then: a layer scan's cache keeps the fingerprint it had before sublayer scans
        settings["sublayers"] = True
    distributed.require_same("the similarity scan", {**settings, "device": None, "texts": distributed.digest(texts)})
    if empty := too_short(tokenizer, texts, max_length=max_length, min_tokens=1):
        raise ValueError(f"texts {empty} have no tokens; remove empty texts")
    settings.update(world_size=distributed.world_size(), rank=distributed.rank())
    fingerprint = _fingerprint(texts, settings)
    device = model_device(model)
    sums = _Sums(groups, size, device)
    with distributed.stop_together():  # a rank that may not resume stops them all
        done = _resume(cache_path, fingerprint, settings, sums)
    mine = distributed.shard(len(texts), batch_size)  # whole batches, as one process runs them
    starts = range(mine.start, mine.stop, batch_size)
    was_training = model.training
    model.eval()
    try:
        with _Residuals(model, device, middles) as residuals:
            for index in progress(range(done, len(starts)), initial=done, total=len(starts), desc=f"similarity scan ({metric})",
                                  unit="batch", show=distributed.is_main()):  # fmt: skip
                batch = texts[starts[index] : starts[index] + batch_size]
                enc = encode(tokenizer, batch, max_length=max_length, device=device, padding_side=tokenizer.padding_side)
                select = _select(enc["attention_mask"], metric)
                text_sums = _pair_sums(residuals(enc, select), metric, select.nonzero()[:, 0], len(batch))
                require_finite(bool(torch.isfinite(text_sums).all()), f"the scan's distances (batch {index})", model)
                sums.add(starts[index], text_sums, select.sum(-1).double())  # groups by the texts' global index
                if cache_path is not None:
                    _checkpoint(cache_path, fingerprint, settings, sums, index + 1)
    finally:
        model.train(was_training)
    if cache_path is not None and not starts:
        _checkpoint(cache_path, fingerprint, settings, sums, 0)  # a rank without texts still marks the split
    sums.tensors = {key: distributed.all_sum(value) for key, value in sums.tensors.items()}
    meta = dict(
        model=name, n_texts=len(texts), tokens=int(sums.tensors["group_counts"].sum()), max_length=max_length,
        metric=metric, groups=groups, num_layers=layers.num_layers(model), placement=placement, versions=artifacts.versions(),
        positions="sublayers" if middles else "layers",
    )  # fmt: skip
    if middles:
        meta["middles"] = [str(middle) for middle in middles]
    return sums.distances(len(texts), meta)
