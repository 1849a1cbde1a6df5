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

    def _freeze(self) -> None:
        """Lists given for tuple settings (ns=[0, 4]) become tuples: a config stays hashable."""
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

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
    quantize: str | None = "auto"  # how kit.steps.scan loads the model: auto (4-bit only if it does not fit) | 4bit | None

    ADDED = ("sublayers", "quantize")

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
    quantize: str | None = "auto"  # how kit.steps.prune loads the model: auto (4-bit only if it does not fit) | 4bit | None

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
    source: str = "corpus"  # kit.steps.heal's healing texts: corpus | c4 (the paper's) | a datasets name (kit.heal takes texts)
    n_train_texts: int = 1000  # kit.steps.heal: training texts, packed into blocks of seq_len tokens
    n_val_texts: int = 16  # kit.steps.heal: validation texts (and the loss comparison after healing)

    ADDED = ("source", "n_train_texts", "n_val_texts")

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


@dataclass(frozen=True)
class EvaluateConfig(_Settings):
    """The evaluations of notebook 04 and `kit.steps.evaluate`: in-context recall, MMLU, validation loss, BoolQ and
    inference cost. The defaults are a 2-core CPU's probe; the paper's MMLU: mmlu_subjects=57, mmlu_per_subject=None."""

    recall_items: int = 40  # in-context recall questions: the question-answering probe of a small model
    recall_facts: int = 6  # "The code for X is Y." lines per question (chance: 1 / recall_facts)
    mmlu_subjects: int = 8  # the first K subjects in alphabetical order (57: all of MMLU)
    mmlu_per_subject: int | None = 6  # questions per subject (None: all)
    shots: int = 5  # MMLU few-shot examples per prompt (paper: 5)
    mmlu: bool | None = None  # evaluate MMLU: None when the unpruned model's 95% interval lies above chance
    n_val_texts: int = 16  # validation texts of the offline corpus for the loss
    max_length: int = 256  # tokens per validation text
    boolq: str | None = None  # "hub" (google/boolq validation), a local .jsonl, or None (no BoolQ)
    n_boolq: int = 200  # BoolQ questions when boolq is set
    batch_size: int = 8  # texts per forward pass
    cost_prompt_tokens: int = 64  # prompt tokens per sequence when timing inference
    cost_new_tokens: int = 16  # tokens generated greedily with the KV cache when timing decoding
    cost_repeats: int = 2  # timed repeats (the median is reported)
    quantize: str | None = "auto"  # auto (4-bit only if the weights do not fit the GPU) | 4bit | None
    seed: int = 0  # the recall questions' seed

    def __post_init__(self):
        self._freeze()
        self._require_positive("recall_items", "recall_facts", "mmlu_subjects", "shots", "n_val_texts", "max_length", "batch_size")


@dataclass(frozen=True)
class SweepConfig(EvaluateConfig):
    """Notebook 04's sweep (`kit.steps.sweep`): the evaluations at every `step`-th block size n (or at `ns`) for each
    criterion, and healed twins of the `heal_ns` block sizes (LoRA with the heal_* settings)."""

    ns: tuple[int, ...] | None = None  # block sizes to evaluate (0: the unpruned model); None: 0, step, 2 step, ...
    step: int = 4  # evaluate every step-th block size when ns is None
    criteria: tuple[str, ...] = ("similarity", "heuristic")  # names in kit.choose.criteria.CRITERIA (the paper's two)
    heal_ns: tuple[int, ...] = (4, 12, 20)  # block sizes healed for each criterion; () to skip
    heal_method: str = "qlora"  # qlora: LoRA with the heal_* settings; or any healing method (kit.healing.methods.HEALERS) at its defaults
    heal_steps: int = 12  # optimiser steps per healed block (paper: 5000)
    heal_batch_size: int = 4  # packed blocks per step
    heal_seq_len: int = 128  # tokens per packed healing block
    heal_rank: int = 8  # LoRA rank, and alpha
    heal_lr: float = 2e-3  # peak learning rate of the cosine schedule
    heal_quantize: str | None = None  # None: LoRA on the full-precision base (faster on a CPU); 4bit: QLoRA
    heal_checkpointing: bool = False  # gradient checkpointing: less memory, more compute (True for large models)
    n_heal_texts: int = 200  # healing texts of the offline corpus

    def heal_config(self):
        """How the healed twins are healed: a HealConfig of the heal_* settings (qlora), or the method's name."""
        if self.heal_method != "qlora":
            return self.heal_method
        return HealConfig(rank=self.heal_rank, lr=self.heal_lr, steps=self.heal_steps, batch_size=self.heal_batch_size,
                          seq_len=self.heal_seq_len, quantize=self.heal_quantize, gradient_checkpointing=self.heal_checkpointing,
                          save_every=self.heal_steps, seed=self.seed)  # fmt: skip


@dataclass(frozen=True)
class CriteriaConfig(_Settings):
    """Notebook 05 (`kit.steps.criteria`): each scan metric's block choices judged by the ablation oracle's held-out loss."""

    model_name: str | None = None  # None: the model of the run's scan
    n_calibration: int = 8  # calibration texts: the scans and the loss criterion choose on these
    n_held_out: int = 8  # held-out texts the criteria are judged on
    max_length: int = 32  # tokens per text
    batch_size: int = 8  # texts per forward pass
    ns: tuple[int, ...] | None = (1, 2, 4, 8, 12)  # block sizes compared (None: every size 1..L-1)
    metrics: tuple[str, ...] = ("angular_last", "angular_all", "block_influence")  # scan metrics, each one criterion
    source: str = "corpus"  # corpus | c4 | a datasets name: train -> calibration, validation -> held out
    quantize: str | None = "auto"  # auto | 4bit | None
    seed: int = 0

    def __post_init__(self):
        self._freeze()
        self._require_positive("n_calibration", "n_held_out", "max_length", "batch_size")


@dataclass(frozen=True)
class BudgetConfig(_Settings):
    """Notebook 06 (`kit.steps.budget`): blocks, layer sets and sublayers removed at the same parameter budgets."""

    model_name: str | None = None  # None: the model of the run's scan
    n_calibration: int = 4  # calibration texts: the scan and the greedy criteria choose on these
    n_held_out: int = 8  # held-out texts the choices are judged on
    max_length: int = 32  # tokens per text
    batch_size: int = 8  # texts per forward pass
    budgets: tuple[float, ...] = (0.03, 0.06, 0.09)  # fractions of the model's parameters removed
    units: tuple[str, ...] = ("block", "layers", "attention", "mlp")  # granularities compared (block: the paper's)
    greedy: bool = True  # also the greedy (SLEB-style) criterion for layers, attention and MLP sublayers
    recall_items: int = 20  # in-context recall questions
    recall_facts: int = 6  # facts per recall question (chance: 1 / recall_facts)
    mmlu_subjects: int = 4  # MMLU subjects measured on the unpruned model (swept where it is above chance)
    mmlu_per_subject: int | None = 4  # questions per subject (None: all)
    shots: int = 5  # MMLU few-shot examples per prompt
    mmlu: bool | None = None  # None: sweep MMLU only when the unpruned model's interval lies above chance
    cost_prompt_tokens: int = 32  # prompt tokens when timing inference
    cost_new_tokens: int = 8  # tokens generated greedily when timing decoding
    cost_repeats: int = 2  # timed repeats (the median is reported)
    source: str = "corpus"  # corpus | c4 | a datasets name: train -> calibration, validation -> held out
    quantize: str | None = "auto"  # auto | 4bit | None
    seed: int = 0

    def __post_init__(self):
        self._freeze()
        self._require_positive("n_calibration", "n_held_out", "max_length", "batch_size", "recall_items", "recall_facts")


@dataclass(frozen=True)
class HealCompareConfig(_Settings):
    """Notebook 07 (`kit.steps.heal_compare`): every healing method on the same cuts, the similarity scan's block at each
    size, with held-out loss, KL to the unpruned model and recall against what each method cost."""

    model_name: str | None = None  # None: the model of the run's scan
    ns: tuple[int, ...] = (4, 8, 12)  # block sizes: each cut is the similarity scan's choice for that n
    methods: tuple[str, ...] = ("none", "linear_patch", "replacement_layer", "last_layers", "qlora", "distill")  # kit.healing.methods.HEALERS
    n_texts: int = 16  # calibration and training texts (the scan, the linear patch, the trained methods)
    n_val_texts: int = 8  # held-out texts: loss and KL to the unpruned model
    max_length: int = 48  # tokens per text (and per packed training block)
    steps: int = 2  # optimiser steps of each trained method (the replacement layer: 4x as many, it trains one layer)
    lr: float = 1e-3  # learning rate of the trained methods
    recall_items: int = 8  # in-context recall questions
    recall_facts: int = 6  # lines of context per question (chance: 1 / recall_facts)
    quantize: str | None = None  # the base of qlora and distill: None (LoRA on the full-precision base) | 4bit (the paper's QLoRA)
    seed: int = 0

    def __post_init__(self):
        self._freeze()
        self._require_positive("n_texts", "n_val_texts", "max_length", "steps", "recall_items", "recall_facts")
