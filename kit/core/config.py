"""Frozen dataclasses holding each step's settings: hashable, serialisable with to_dict(), digested for
caches and manifests.

What takes them: `kit.heal` takes a `HealConfig`. `kit.angular_distances(model, tokenizer, texts, config)`
takes a `ScanConfig` and reads its metric, batch_size, max_length, model_name, groups and sublayers; its source,
split and n_texts say where the texts come from, and the caller loads them
(`kit.loaders.data.load_texts(config.source, config.split, config.n_texts)`, as notebook 01 and `python -m kit scan`
do), so that the numeric code never reaches the loaders. `PruneConfig` is notebook 02's record of its
choices (written to its manifest); no function takes it whole: `kit.choose.criteria.choose_block(config.criterion,
num_layers, config.n, start=config.start)` takes its fields."""

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace


class _Settings:
    ADDED: tuple[str, ...] = ()  # settings added after the first release: left out of the digest at their default

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """A short stable hash of the settings, for manifests and cache keys: a setting added later (ADDED)
        counts only when set, so caches named by an older digest (notebook 01's scan-{digest}) still resume."""
        defaults = {f.name: f.default for f in fields(self)}
        settings = {k: v for k, v in self.to_dict().items() if not (k in self.ADDED and v == defaults[k])}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def replace(self, **changes):
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(sorted(unknown))}; its settings: "
                            f"{', '.join(f.name for f in fields(self))}")  # fmt: skip
        return replace(self, **changes)

    def _require_positive(self, *names: str) -> None:
        """A ValueError naming the first of the integer settings `names` below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScanConfig(_Settings):
    """Settings of a layer-similarity scan: what `angular_distances` takes, and what names its cache."""

    model_name: str | None = None  # the model scanned (recorded in the result; None: model.name_or_path)
    source: str = "corpus"  # calibration text: corpus | mmlu | c4 | any datasets name
    split: str = "train"  # split of `source`
    n_texts: int = 256  # calibration texts
    batch_size: int = 8  # texts per forward pass
    max_length: int = 512  # tokens per text, longer texts are truncated
    metric: str = "angular_last"  # angular_last (paper) | angular_all | block_influence
    groups: int | None = None  # round-robin groups of texts for Distances.stability (None: min(32, texts))
    sublayers: bool = False  # also each layer's middle (after attention, before the MLP): 2L + 1 positions

    ADDED = ("sublayers",)

    def __post_init__(self):
        self._require_positive("n_texts", "batch_size", "max_length")


@dataclass(frozen=True)
class PruneConfig(_Settings):
    """Settings of a pruning step (notebook 02): the block to remove and the loss measured before and after."""

    n: int = 6  # block size: consecutive layers removed
    start: int | None = None  # first layer of the block; None: the block `criterion` picks for n
    criterion: str = "similarity"  # a name in kit.choose.criteria.CRITERIA: similarity (the scan's smallest distance) | heuristic | ...
    n_val_texts: int = 32  # validation texts for the loss comparison
    max_length: int = 256  # tokens per validation text
    batch_size: int = 8  # texts per forward pass

    def __post_init__(self):
        self._require_positive("n", "n_val_texts", "max_length", "batch_size")
        if self.start is not None and self.start < 0:
            raise ValueError(f"start must be >= 0 or None (the criterion's block), got {self.start}")


# The paper's Appendix A: per-model LoRA rank and peak learning rate (its Qwen-7B/14B are Qwen 1, a
# remote-code architecture the kit does not load; the figures are kept as the paper's record).
PAPER_HEALING = {
    "llama-2-7b": (2, 3e-4),
    "llama-2-13b": (64, 3e-4),
    "llama-2-70b": (8, 3e-5),
    "qwen-7b": (64, 3e-4),
    "qwen-14b": (64, 3e-4),
    "mistral-7b": (4, 3e-6),
    "phi-2": (64, 2e-4),
}


@dataclass(frozen=True)
class HealConfig(_Settings):
    """QLoRA healing settings; defaults follow the paper's Appendix A (rank and LR per model: paper())."""

    rank: int = 8  # LoRA rank r
    alpha: float | None = None  # LoRA alpha; None means alpha = rank (paper)
    dropout: float = 0.05  # LoRA dropout
    target_modules: str | tuple[str, ...] = "mlp"  # mlp (paper) | all-linear | explicit module names
    lr: float = 3e-4  # peak learning rate
    scheduler: str = "cosine"  # any transformers lr_scheduler_type
    warmup_steps: int = 100  # capped at a tenth of `steps` for short runs, see effective_warmup
    steps: int = 5000  # optimiser steps
    batch_size: int = 16  # packed blocks per forward
    grad_accum: int = 1  # global batch = batch_size * grad_accum (x processes under DDP; paper: 16)
    seq_len: int = 512  # tokens per packed training block
    quantize: str | None = "4bit"  # 4bit (QLoRA, NF4 base) | None (LoRA on the plain-precision base)
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% slower
    log_every: int = 10  # steps between recorded training losses
    eval_every: int = 250  # steps between validation losses
    save_every: int = 500  # steps between resumable checkpoints
    distill_weight: float = 0.0  # w in (1 - w) * LM loss + w * KL(teacher || student); 0 = paper
    distill_temperature: float = 1.0  # softmax temperature T of the distillation KL (scaled by T^2)
    seed: int = 0

    def __post_init__(self):
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.quantize not in ("4bit", None):
            raise ValueError(f"quantize must be '4bit' or None, not {self.quantize!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr} (the paper's peak learning rates are 3e-6 to 3e-4)")
        if self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or self.warmup_steps < 0:
            raise ValueError(f"need alpha > 0, 0 <= dropout < 1 and warmup_steps >= 0; got {self.alpha}, {self.dropout}, {self.warmup_steps}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        self._require_positive("rank", "steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "save_every")

    @property
    def effective_warmup(self) -> int:
        return min(self.warmup_steps, max(1, self.steps // 10))

    @property
    def global_batch(self) -> int:
        """Blocks per optimiser step in one process (times the number of processes under DDP)."""
        return self.batch_size * self.grad_accum

    @classmethod
    def paper(cls, model_name: str, **overrides) -> "HealConfig":
        """The paper's rank and peak LR for one of its seven models, e.g. 'meta-llama/Llama-2-7b-hf'."""
        base = model_name.rstrip("/").split("/")[-1].lower()
        for key, (rank, lr) in PAPER_HEALING.items():
            if base == key or base.startswith(key + "-"):
                return cls(**{"rank": rank, "lr": lr, **overrides})
        raise ValueError(
            f"No paper healing recipe for {model_name!r}. The paper's models are: "
            f"{', '.join(PAPER_HEALING)}. Build HealConfig(rank=..., lr=...) yourself for others."
        )
