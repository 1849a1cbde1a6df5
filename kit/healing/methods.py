"""Healing a cut, by any method, into a plain checkpoint: the registry HEALERS (name -> Healer) and one
entry point, `heal_cut(method, model, tokenizer, block, texts, out_dir=...)`. Every method takes the
ORIGINAL model (cut in place: the caller's model is consumed), collects from it what it needs, cuts the
block, heals, and writes a checkpoint that `AutoModelForCausalLM.from_pretrained` loads without the kit,
with healing.json beside it (method, settings, cost, the method's own record).

    none             the cut alone
    qlora            LoRA adapters on a 4-bit base (kit.heal), merged (kit.merge_adapter): HealConfig
    distill          the same, trained toward the unpruned model's logits: HealConfig(distill_weight > 0)
    linear_patch     training-free least squares merged into the MLP before the cut: LinearPatchConfig
    replacement_layer  one layer in place of the block, trained on the hidden states: ReplacementLayerConfig
    last_layers      the last k layers and the LM head fine-tuned: LastLayersConfig"""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.artifacts import save_checkpoint
from ..core.block import Block
from ..core.config import HealConfig
from ..core.device import model_device
from ..core.layers import num_layers
from ..prune import drop_layers, dropped, save_pruned
from ..prune.sublayers import materialised
from .last_layers import LastLayersConfig, last_layers
from .linear_patch import LinearPatchConfig, linear_patch
from .replacement import ReplacementLayerConfig, replacement_layer

RECORD_FILE = "healing.json"  # in the checkpoint: {"method", "config", "cost", "record"}


@dataclass(frozen=True)
class Healer:
    """A healing method: its settings class (None: it has none) and its function
    (model, tokenizer, block, texts, config, *, work_dir, val_texts) -> (healed model, record); the record
    may carry "trained_parameters" and "added_parameters", which go into the cost."""

    name: str
    config: type | None
    heal: Callable
    summary: str


@dataclass
class Healed:
    """A healed cut: the plain model in memory, its checkpoint, what it cost and the method's record."""

    model: nn.Module
    path: Path
    method: str
    config: object
    cost: dict  # wall_s, cpu_s, gpu_s (None on CPU), trained_parameters, added_parameters, parameters
    record: dict = field(default_factory=dict)


def _none(model, tokenizer, block, texts, config, **_):
    return drop_layers(model, block, inplace=True), {}


def _lora(model, tokenizer, block, texts, config: HealConfig, *, work_dir: Path, val_texts=None):
    """kit.heal on the cut (distilled from the original when config.distill_weight > 0: then the original
    stays in memory as the teacher beside the cut), then kit.merge_adapter into its checkpoint."""
    from transformers import AutoModelForCausalLM

    from .merge import merge_adapter
    from .train import heal

    pruned = work_dir / "pruned"
    if config.distill_weight > 0:
        with dropped(model, block):
            save_pruned(model, tokenizer, pruned)
        student, teacher = str(pruned), model
    else:
        save_pruned(drop_layers(model, block, inplace=True), tokenizer, pruned)
        student, teacher = model, None
    result = heal(student, tokenizer, texts, config, output_dir=work_dir / "heal", val_texts=val_texts, teacher=teacher)
    trained = sum(p.numel() for n, p in result.model.named_parameters() if "lora_" in n)
    device, history = model_device(result.model), result.history
    del result, student, teacher
    merged = merge_adapter(pruned, work_dir / "heal" / "adapter", work_dir / "merged")
    healed = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").to(device).eval()
    return healed, {"trained_parameters": trained, "history": history}


HEALERS: dict[str, Healer] = {
    "none": Healer("none", None, _none, "the cut alone"),
    "qlora": Healer("qlora", HealConfig, _lora, "LoRA on the MLPs of a 4-bit base (the paper's), merged"),
    "distill": Healer("distill", HealConfig, _lora, "LoRA trained toward the unpruned model's logits, merged"),
    "linear_patch": Healer("linear_patch", LinearPatchConfig, linear_patch, "least squares merged into the MLP before the cut"),
    "replacement_layer": Healer("replacement_layer", ReplacementLayerConfig, replacement_layer,
                                "one layer in place of the block, trained on hidden states"),  # fmt: skip
    "last_layers": Healer("last_layers", LastLayersConfig, last_layers, "the last k layers and the LM head fine-tuned"),
}
DEFAULTS = {"distill": HealConfig(distill_weight=0.5)}  # a method's settings when only its name is given


def resolve(method) -> tuple[str, object]:
    """(name, settings) of a method given by name (its default settings) or by its settings object
    (a HealConfig is "distill" when its distill_weight > 0, else "qlora")."""
    if isinstance(method, str):
        if method not in HEALERS:
            raise ValueError(f"No healing method {method!r}: choose one of {', '.join(HEALERS)}.")
        healer = HEALERS[method]
        return method, DEFAULTS.get(method, healer.config() if healer.config else None)
    if isinstance(method, HealConfig):
        return ("distill" if method.distill_weight > 0 else "qlora"), method
    for name, healer in HEALERS.items():
        if healer.config is not None and isinstance(method, healer.config):
            return name, method
    raise TypeError(f"heal_cut takes a method name ({', '.join(HEALERS)}) or the settings of one, not {type(method).__name__}.")


class _Clock:
    """Wall, CPU (this process) and, on a GPU, CUDA-event seconds of a `with` block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        if self.cuda:
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.events[0].record()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.gpu = None
        if self.cuda:
            self.events[1].record()
            torch.cuda.synchronize()
            self.gpu = self.events[0].elapsed_time(self.events[1]) / 1000


def heal_cut(method, model: nn.Module, tokenizer, block: Block, texts: list[str], *, out_dir, val_texts=None) -> Healed:
    """Remove `block` from `model` (in place: do not use `model` afterwards) and heal the cut by `method`.

    Args:
        method: a name in HEALERS (its default settings) or a settings object (HealConfig, LinearPatchConfig,
            ReplacementLayerConfig, LastLayersConfig).
        model, tokenizer: the ORIGINAL (unpruned) full-precision model.
        block: the layers to remove, a Block(start, n).
        texts: calibration (linear_patch) or training texts; val_texts: held-out texts for the trainers' validation.
        out_dir: where the plain checkpoint goes (written atomically); a work folder beside it is removed after.
    Returns a Healed: the healed model in memory, out_dir, the cost and the method's record."""
    name, config = resolve(method)
    if not isinstance(block, Block):
        raise TypeError(f"heal_cut heals the cut of one block of consecutive layers, a kit.Block(start, n), not {block!r}")
    block.check(num_layers(model))
    out_dir = Path(out_dir)
    work_dir = out_dir.parent / f".{out_dir.name}.work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    before = sum(p.numel() for p in model.parameters())
    try:
        with _Clock(model_device(model)) as clock:
            healed, record = HEALERS[name].heal(model, tokenizer, block, texts, config, work_dir=work_dir, val_texts=val_texts)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = dict(record)
    cost = {"wall_s": clock.wall, "cpu_s": clock.cpu, "gpu_s": clock.gpu,
            "trained_parameters": int(record.pop("trained_parameters", 0)), "added_parameters": int(record.pop("added_parameters", 0)),
            "parameters": sum(p.numel() for p in healed.parameters()), "original_parameters": before}  # fmt: skip
    summary = {"method": name, "block": [block.start, block.n], "config": config.to_dict() if config else None,
               "cost": cost, "record": record}  # fmt: skip
    with materialised(healed):
        save_checkpoint(out_dir, healed, tokenizer, files={RECORD_FILE: json.dumps(summary, indent=1, default=str)})
    return Healed(healed.eval(), out_dir, name, config, cost, record)
