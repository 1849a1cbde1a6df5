"""Healing throughput: kit.heal against a plain peft + Trainer script on the same configuration
(same 4-bit embedded model, packed blocks, LoRA settings, steps; goal: ratio >= 0.95).

Both are timed end to end (load and quantize, LoRA, packing, training, adapter save): tokens/s is
steps x batch x seq_len over the wall time. Runs are interleaved and the best of REPEATS kept."""

import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import Trainer, TrainingArguments, default_data_collator

import kit
from kit.healing import heal, pack

MODEL = "smollm2-135m"
CONFIG = kit.HealConfig(rank=8, steps=4, batch_size=2, seq_len=128, save_every=4, log_every=1)
N_TEXTS, REPEATS = 16, 2


def baseline(texts, output_dir: Path):
    """What one would write by hand with peft and the Trainer, with CONFIG's settings."""
    model, tokenizer = kit.load_model(MODEL, quantize="4bit")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(
        r=CONFIG.rank, lora_alpha=CONFIG.alpha, lora_dropout=CONFIG.dropout,
        target_modules=["gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    blocks = pack(tokenizer, texts, CONFIG.seq_len)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=CONFIG.steps, per_device_train_batch_size=CONFIG.batch_size,
        learning_rate=CONFIG.lr, lr_scheduler_type="cosine", warmup_steps=CONFIG.effective_warmup,
        logging_steps=CONFIG.log_every, save_steps=CONFIG.save_every, seed=CONFIG.seed, report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    train = [{"input_ids": b, "labels": b} for b in blocks]
    Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator).train()
    model.save_pretrained(output_dir / "adapter")


def healed(texts, output_dir: Path):
    model, tokenizer = kit.load_model(MODEL, quantize="4bit")
    heal(model, tokenizer, texts, CONFIG, output_dir=output_dir)


def main():
    texts = kit.data.load_texts("corpus", "train", N_TEXTS)
    tokens = CONFIG.steps * CONFIG.global_batch * CONFIG.seq_len
    best = {"peft + Trainer": float("inf"), "kit.heal": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(REPEATS):
            for name, fn in (("peft + Trainer", baseline), ("kit.heal", healed)):
                start = time.perf_counter()
                fn(texts, Path(tmp) / f"{name}-{repeat}")
                best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: tokens / seconds for name, seconds in best.items()}
    shape = f"{CONFIG.steps} steps x {CONFIG.batch_size} x {CONFIG.seq_len} tokens"
    print(f"healing {MODEL} 4-bit, {shape}, best of {REPEATS}:")
    for name, value in rate.items():
        print(f"  {name:<15} {value:7.1f} tokens/s ({best[name]:.1f} s end to end)")
    print(f"  kit.heal / peft + Trainer throughput: {rate['kit.heal'] / rate['peft + Trainer']:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
