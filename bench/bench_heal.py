"""Healing throughput: kit.heal against a plain peft + Trainer script on the same configuration
(same 4-bit embedded model, packed blocks, LoRA settings, steps; goal: ratio >= 0.95).

Both are timed end to end (load and quantize, LoRA, packing, training, adapter save): tokens/s is
steps x batch x seq_len over the wall time. The two run in turn REPEATS times; the ratio is taken per
repeat and printed as its median with its spread. Three steps per run instead of four keep three
repeats at about the time two cost."""

import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

import kit
from bench.measure import interleaved, ratios, spread, wall_seconds
from kit.core.progress import silenced
from kit.healing.train import heal, pack

MODEL = "smollm2-135m"
CONFIG = kit.HealConfig(rank=8, steps=3, batch_size=2, seq_len=128, save_every=3, log_every=1)
N_TEXTS, REPEATS = 16, 3


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
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=silenced(),
    )  # fmt: skip
    train = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)  # as kit.heal: no per-step dicts where the bars are off (TQDM_DISABLE=1)
    trainer.train()
    model.save_pretrained(output_dir / "adapter")


def healed(texts, output_dir: Path):
    model, tokenizer = kit.load_model(MODEL, quantize="4bit")
    heal(model, tokenizer, texts, CONFIG, output_dir=output_dir)


def main():
    texts = kit.loaders.data.load_texts("corpus", "train", N_TEXTS)
    tokens = CONFIG.steps * CONFIG.global_batch * CONFIG.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"peft + Trainer": baseline, "kit.heal": healed}  # each run into a fresh folder
        seconds = interleaved({name: lambda fn=fn: fn(texts, Path(tempfile.mkdtemp(dir=tmp))) for name, fn in runs.items()},
                              REPEATS, measure=wall_seconds)  # fmt: skip
    shape = f"{CONFIG.steps} steps x {CONFIG.batch_size} x {CONFIG.seq_len} tokens"
    print(f"healing {MODEL} 4-bit, {shape}, medians of {REPEATS} interleaved repeats:")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<15} {tokens / median:7.1f} tokens/s ({median:.1f} s end to end)")
    throughput = spread(ratios(seconds["peft + Trainer"], seconds["kit.heal"]), 3)  # equal tokens: the inverse time ratio
    print(f"  kit.heal / peft + Trainer throughput: {throughput} (goal >= 0.95)")


if __name__ == "__main__":
    main()
