"""Fine-tuning the last layers (after "Reassessing Layer Pruning in LLMs", Lu et al., ICLR 2026): after
the cut, only the last k decoder layers and the LM head train, in full precision, on the LM loss of the
healing texts (packed as kit.healing.train packs them, trained by its Trainer). Nothing is added: the
checkpoint is the cut's architecture with new weights in those layers (and in the embeddings, where the
LM head is tied to them)."""

from dataclasses import dataclass
from pathlib import Path

from transformers import PrinterCallback, default_data_collator

from ..core import layers
from ..core.block import Block
from ..core.config import HealConfig, _Settings
from ..prune import drop_layers
from .train import Blocks, HealTrainer, pack, training_arguments


@dataclass(frozen=True)
class LastLayersConfig(_Settings):
    """Settings of fine-tuning the last k layers (and the LM head) of the cut model."""

    k: int = 2  # decoder layers trained, counted from the last
    head: bool = True  # also train the LM head (and so the embeddings, where the two are tied)
    steps: int = 100  # optimiser steps
    lr: float = 5e-5  # peak learning rate (cosine schedule)
    warmup_steps: int = 10  # capped at a tenth of steps
    batch_size: int = 8  # packed blocks per step
    seq_len: int = 128  # tokens per packed block
    seed: int = 0

    def __post_init__(self):
        self._require_positive("k", "steps", "batch_size", "seq_len")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0 and warmup_steps >= 0, got lr={self.lr}, warmup_steps={self.warmup_steps}")

    def trainer_settings(self) -> HealConfig:
        """The HealConfig whose Trainer settings (schedule, batch, seed) kit.healing.train reads."""
        return HealConfig(steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, batch_size=self.batch_size,
                          seq_len=self.seq_len, quantize=None, seed=self.seed, log_every=max(1, self.steps // 20),
                          eval_every=max(1, self.steps // 4), save_every=self.steps + 1)  # fmt: skip


def last_layers(model, tokenizer, block: Block, texts, config: LastLayersConfig, *, work_dir: Path, val_texts=None, **_):
    """Cut `block` from `model` in place and fine-tune its last config.k layers (and LM head). Returns the
    model and the record: the training and validation losses the Trainer logged."""
    remaining = layers.num_layers(model) - block.n
    if config.k > remaining:
        raise ValueError(f"k={config.k} is more layers than the cut model's {remaining}: choose 1 <= k <= {remaining}.")
    drop_layers(model, block, inplace=True)
    kept = layers.decoder_layers(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for layer in kept[len(kept) - config.k :] for p in layer.parameters()]
    if config.head:
        trained += list(layers.lm_head(model).parameters())
    for p in trained:
        p.requires_grad_(True)
    settings = config.trainer_settings()
    train = Blocks(pack(tokenizer, list(texts), config.seq_len))
    val = Blocks(pack(tokenizer, list(val_texts), config.seq_len)) if val_texts else None
    use_cache = getattr(model.config, "use_cache", None)  # a multimodal config may have none
    model.config.use_cache = False
    try:
        trainer = HealTrainer(model=model, args=training_arguments(settings, work_dir / "trainer", evaluate=val is not None, model=model),
                              train_dataset=train, eval_dataset=val, data_collator=default_data_collator)  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if use_cache is None:
            del model.config.use_cache
        else:
            model.config.use_cache = use_cache
    log = trainer.state.log_history
    record = {"train": [{"step": e["step"], "loss": e["loss"]} for e in log if "loss" in e],
              "validation": [{"step": e["step"], "loss": e["eval_loss"]} for e in log if "eval_loss" in e],
              "tied_head": config.head and layers.lm_head(model).weight is model.get_input_embeddings().weight}  # fmt: skip
    unique = {id(p): p.numel() for p in trained}
    return model.eval(), {**record, "trained_parameters": sum(unique.values()), "added_parameters": 0}
