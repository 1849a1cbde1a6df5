"""Healing after the paper's Appendix A: LoRA adapters (kit.healing.lora) on a 4-bit NF4 base, trained
with the HF Trainer on packed text blocks, resumable from its checkpoints; optionally distilled from the
unpruned model. kit.healing.merge turns the adapter into a plain checkpoint."""

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PrinterCallback, Trainer, TrainerState, TrainingArguments, default_data_collator
from transformers.training_args import ParallelMode

from ..core import distributed
from ..core.artifacts import read_json, save_checkpoint, write_json
from ..core.config import HealConfig
from ..core.device import compute_dtype, mixed_precision, model_device
from ..core.progress import silenced
from ..core.sums import chunk_size
from ..core.text import batched
from ..loaders.models import load_model
from .lora import kept_dtypes, lora_model, reloaded

ADAPTER_DIR = "adapter"  # inside output_dir: the final adapter; Trainer's checkpoint-N folders sit beside it
CONFIG_FILE = "heal_config.json"  # inside output_dir: the settings its checkpoints were trained with


@dataclass
class HealResult:
    model: nn.Module  # the (quantized) base with the trained LoRA adapters, a peft model
    history: dict  # {"train": [{step, loss, learning_rate}, ...], "validation": [{step, loss}, ...], "world_size", "global_batch"}
    adapter_path: Path  # the saved adapter, for merge_adapter or PeftModel.from_pretrained


# ---------------------------------------------------------------------------------------- data


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """All texts as one token stream, each text followed by EOS, cut into rows of seq_len tokens
    (the incomplete last row is dropped). Returns a LongTensor of shape (blocks, seq_len)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token to separate packed texts: set tokenizer.eos_token.")
    chunks = []
    for batch in batched(texts, 1000, desc="tokenizing" if distributed.is_main() else None):
        ids = tokenizer(list(batch), add_special_tokens=False, verbose=False)["input_ids"]
        chunks.append(np.fromiter((t for row in ids for t in (*row, eos)), dtype=np.int64))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(
            f"The texts hold {len(stream)} tokens, less than one block of seq_len={seq_len}: "
            "pass more texts or a smaller seq_len."
        )
    return torch.from_numpy(stream[: n * seq_len]).view(n, seq_len)


class Blocks(torch.utils.data.Dataset):
    """Packed blocks as causal-LM examples: the labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# ---------------------------------------------------------------------------------------- model


def _base_model(model_or_path, tokenizer, quantize: str | None, scratch: Path) -> nn.Module:
    """The model to put adapters on: loaded from a path (4-bit if asked), or the in-memory model,
    re-loaded through a checkpoint in `scratch` when it must be quantized (bitsandbytes quantizes
    while loading)."""
    if isinstance(model_or_path, (str, Path)):
        return load_model(str(model_or_path), quantize=quantize)[0]
    model = model_or_path
    if quantize is None or getattr(model, "is_loaded_in_4bit", False):
        return model
    return reloaded(model, tokenizer, quantize, scratch)


@contextmanager
def _training_layout(model: nn.Module):
    """Keep 4-bit weights in their training layout for the duration of the block.

    On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights at the first inference forward
    and unpacks them at the next training forward, re-quantizing the double-quantized scales:
    each validation pass would nudge the frozen base (and break exact resumption)."""
    repacking = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in repacking:
        module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module in repacking:
            module.support_avx512bf16_for_cpu = True


# ---------------------------------------------------------------------------------------- training


_KL_TOKENS = 256  # positions per distillation chunk: two [chunk, vocab] fp32 tensors at a time


def _kl_chunk(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1) * temperature**2


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions at each
    position, times T^2 so gradients keep their scale (Hinton et al. 2015); shape logits.shape[:-1].

    Computed over chunks of positions, each recomputed in the backward pass (activation
    checkpointing), so no [batch, tokens, vocab] fp32 tensor is ever held."""
    student, teacher = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    step = chunk_size(_KL_TOKENS, len(student), student.shape[-1])
    chunks = [
        checkpoint(_kl_chunk, student[i : i + step], teacher[i : i + step], temperature, use_reentrant=False)
        for i in range(0, len(student), step)
    ]
    return torch.cat(chunks).view(student_logits.shape[:-1])


class HealTrainer(Trainer):
    """Trainer whose training loss is (1 - w) * LM loss + w * KL to a teacher's logits when a
    teacher is given; evaluation always reports the plain LM loss."""

    def __init__(self, *args, teacher: nn.Module | None = None, distill_weight=0.0, temperature=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.distill_weight, self.temperature = distill_weight, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher is not None and model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"].to(self.teacher.device)).logits
            # positions that predict a label, normalised like the LM loss (over the whole accumulated batch)
            student_logits, teacher_logits = outputs.logits[:, :-1], teacher_logits[:, :-1].to(outputs.logits.device)
            kl = distillation_kl(student_logits, teacher_logits, self.temperature)
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                kl = kl.sum() / num_items_in_batch
            else:
                kl = kl.mean()
            loss = (1 - self.distill_weight) * loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


def training_arguments(
    config: HealConfig, output_dir: Path, *, evaluate: bool, resuming: bool = False, model: nn.Module | None = None
) -> TrainingArguments:
    """The Trainer settings of a healing run (validation also at step 0, unless resuming).

    Mixed precision follows the device policy for `model` (bf16 only where the GPU has it natively,
    else fp16; none on CPU). Without a distributed launch the run uses the model's one GPU, so the
    global batch stays batch_size * grad_accum however many GPUs are visible; under `accelerate launch
    --num_processes N` (or torchrun) each process trains on its own batches through DDP and the global
    batch is batch_size * grad_accum * N (recorded in the history and heal_config.json)."""
    precision = mixed_precision(compute_dtype(model), model_device(model)) if model is not None else {}
    on_cpu = model is not None and model_device(model).type == "cpu"  # train where the model is (gloo DDP on CPUs)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.effective_warmup,
        logging_steps=config.log_every,
        eval_strategy="steps" if evaluate else "no",
        eval_on_start=evaluate and not resuming,
        eval_steps=config.eval_every,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # under DDP: every LoRA weight gets a gradient at every step
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=silenced(),  # TQDM_DISABLE=1: no bar (and heal() drops the dicts printed instead)
        use_cpu=on_cpu,
        **precision,
    )
    return single_gpu(args)


def single_gpu(args: TrainingArguments) -> TrainingArguments:
    """Without a distributed launch the Trainer multiplies the per-device batch by the number of
    visible GPUs (DataParallel); the kit's model sits on one GPU, so it trains on that one, as the
    Trainer itself does for models placed by a device map. Use `accelerate launch` for several."""
    if args.n_gpu > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        args._n_gpu = 1
    return args


def _require_trainer_gpu(model: nn.Module) -> None:
    """Without a launcher the Trainer trains on cuda:0: a 4-bit model on another GPU is refused by
    accelerate, a full-precision one silently moved. Stop first, saying how to use that GPU."""
    device, placed = model_device(model), {str(d) for d in getattr(model, "hf_device_map", {}).values()}
    if device.type == "cuda" and (device.index or 0) != 0 and len(placed) < 2 and not distributed.active():
        raise ValueError(
            f"the model is on {device}, but without a launcher the HF Trainer trains on cuda:0. To heal on GPU "
            f"{device.index}, run with CUDA_VISIBLE_DEVICES={device.index} (it is then cuda:0) and DEVICE='cuda'; "
            "or load the model on cuda:0."
        )


def _last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest Trainer checkpoint written to the end (its trainer_state.json, saved last, parses);
    newer ones cut short by a crash are deleted, and training resumes before them."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for _, folder in reversed(steps):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            shutil.rmtree(folder)
    return None


def _check_resumable(output_dir: Path, config: HealConfig) -> str | None:
    """The last checkpoint in output_dir (None if there is none), after checking that it was
    trained with the same settings on as many processes; records both for later runs. Rank 0 does
    this (it alone writes there) and tells every rank."""
    world = distributed.world_size()

    def check():
        last = _last_complete_checkpoint(output_dir)
        record = output_dir / CONFIG_FILE
        before = read_json(record) if last is not None and record.exists() else None
        if before is not None and before["digest"] != config.digest():
            raise ValueError(
                f"{output_dir} holds checkpoints of a healing run with different settings ({record}). "
                "Delete that folder to start afresh, or pass another output_dir."
            )
        trained_on = before.get("world_size", 1) if before is not None else world  # older records: one process
        if trained_on != world:
            raise ValueError(
                f"{output_dir} holds checkpoints of a healing run on {trained_on} process(es) (global "
                f"batch {before.get('global_batch', config.global_batch)}), this one runs on {world}: resume it with "
                f"as many (accelerate launch --num_processes {trained_on}), or delete that folder to start afresh."
            )
        write_json(record, {"digest": config.digest(), "config": config.to_dict(), "world_size": world,
                            "global_batch": config.global_batch * world})  # fmt: skip
        return last

    return distributed.on_main(check)


def _history(log_history: list[dict], config: HealConfig) -> dict:
    train = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e["learning_rate"]} for e in log_history if "loss" in e
    ]
    validation = [{"step": e["step"], "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    world = distributed.world_size()
    return {"train": train, "validation": validation, "world_size": world, "global_batch": config.global_batch * world}


def heal(
    model_or_path,
    tokenizer,
    texts: list[str],
    config: HealConfig,
    *,
    output_dir,
    val_texts: list[str] | None = None,
    teacher: nn.Module | None = None,
    callbacks=(),
) -> HealResult:
    """Train LoRA adapters on a (pruned) model to restore its language-modelling loss.

    model_or_path: a checkpoint folder or model name (loaded 4-bit when config.quantize == "4bit"),
        or an in-memory model (which gets its adapters in place, unless it must be quantized first:
        then it is re-loaded 4-bit through a temporary checkpoint in output_dir).
    texts / val_texts: packed into blocks of config.seq_len tokens; validation loss at step 0 and
        every config.eval_every steps.
    output_dir: Trainer checkpoints (every config.save_every steps) and the final adapter; a run
        interrupted there resumes from its last checkpoint when called again with the same settings
        (and, under `accelerate launch` / torchrun, as many processes: each trains on its share of
        every global batch through DDP, and rank 0 alone writes output_dir).
    teacher: the unpruned model, required when config.distill_weight > 0 (and only then).
    callbacks: extra transformers TrainerCallbacks.
    """
    if (teacher is not None) != (config.distill_weight > 0):
        raise ValueError(
            "Distillation needs both a teacher model and config.distill_weight > 0: "
            f"got teacher={'a model' if teacher is not None else None}, distill_weight={config.distill_weight}."
        )
    if not isinstance(model_or_path, (str, Path)):
        _require_trainer_gpu(model_or_path)
    output_dir = Path(output_dir)
    distributed.init()  # under accelerate launch / torchrun: join the group before rank 0 checks output_dir
    distributed.require_same("healing", dict(texts=distributed.digest(texts), val_texts=distributed.digest(val_texts or []),
                                             config=config.digest()))  # fmt: skip
    last = _check_resumable(output_dir, config)
    train = Blocks(pack(tokenizer, texts, config.seq_len))
    val = Blocks(pack(tokenizer, val_texts, config.seq_len)) if val_texts else None
    base = _base_model(model_or_path, tokenizer, config.quantize, output_dir)
    with kept_dtypes(base):  # trained with a 4-bit base's norms in fp32; computes in the base's dtypes after
        model = lora_model(base, config)
        trainer = _train(model, config, output_dir, train, val, last, teacher, callbacks)
    adapter_path = output_dir / ADAPTER_DIR
    if distributed.is_main():
        save_checkpoint(adapter_path, model)
    distributed.barrier()  # every rank returns once the adapter is on disk
    return HealResult(model.eval(), _history(trainer.state.log_history, config), adapter_path)


def _train(model, config: HealConfig, output_dir: Path, train, val, last, teacher, callbacks) -> HealTrainer:
    """The Trainer of `model`, trained (or, finished before, loaded from its last checkpoint `last`)."""
    trainer = HealTrainer(
        model=model,
        args=training_arguments(config, output_dir, evaluate=val is not None, resuming=last is not None, model=model),
        train_dataset=train,
        eval_dataset=val,
        data_collator=default_data_collator,
        callbacks=list(callbacks),
        teacher=teacher,
        distill_weight=config.distill_weight,
        temperature=config.distill_temperature,
    )
    trainer.remove_callback(PrinterCallback)  # prints each log dict where bars are off; the history keeps them
    if last is not None and TrainerState.load_from_json(f"{last}/trainer_state.json").global_step >= config.steps:
        trainer._load_from_checkpoint(last)  # finished before: training again would add a step
        trainer.state = TrainerState.load_from_json(f"{last}/trainer_state.json")
    else:
        with _training_layout(model):
            trainer.train(resume_from_checkpoint=last)
    return trainer
