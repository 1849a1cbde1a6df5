"""Every data-parallel path of the kit on one tiny model: the scan, MMLU, BoolQ, the validation loss,
the ablation oracle, the greedy removal, a sweep of two points with the second also healed, and three healing steps.
tests/test_distributed.py runs `work` in its own process (the one-process reference) and this file
under `torchrun --nproc_per_node 2` (gloo, CPU), where healing is interrupted after step 2 and resumed,
and each rank saves what it got to OUT/rank{r}.pt.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT [disagree | short]
"""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import kit
from kit.core import distributed
from kit.core.config import HealConfig
from kit.evaluate import boolq, metrics, mmlu, validation_loss
from kit.experiments import sweep
from kit.loaders import data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
N_TEXTS, BATCH = 7, 2  # 4 batches of the scan: split 2 + 2 over two ranks, 4 + 3 texts (uneven)
GLOBAL_BATCH = 2  # healing blocks per optimiser step, over all processes


def inputs(disagree: bool = False):
    """The model and the work; with `disagree`, rank 1 is given other texts than rank 0."""
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    texts = data.corpus("validation")[: N_TEXTS + (disagree and distributed.rank() == 1)]
    questions = data.mmlu_questions(["anatomy", "marketing"], per_subject=3)[:5]  # 5 questions: 3 + 2 over two ranks
    items = data.boolq_items(str(FIXTURES / "boolq.jsonl"), n=5)
    return model, tokenizer, texts, questions, items


def heal_config(world_size: int) -> HealConfig:
    """Three steps at the same global batch however many processes share it (no dropout: no randomness per rank)."""
    return HealConfig(rank=2, dropout=0.0, lr=1e-2, steps=3, warmup_steps=0, batch_size=GLOBAL_BATCH // world_size,
                      seq_len=16, quantize=None, log_every=1, eval_every=3, save_every=2)  # fmt: skip


class Interrupted(Exception):
    pass


class StopBefore(TrainerCallback):
    """Interrupts training before optimiser step `step`, as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise Interrupted


def work(out: Path, disagree: bool = False, interrupt: bool = False) -> dict:
    """What each path returns here, on this process's share of the work; with `interrupt`, healing is
    stopped after step 2 and resumed from its checkpoint."""
    model, tokenizer, texts, questions, items = inputs(disagree)
    scan = kit.angular_distances(model, tokenizer, texts, batch_size=BATCH, max_length=32, groups=3,
                                 cache_path=out / "scan.safetensors")  # fmt: skip
    sublayer_scan = kit.angular_distances(model, tokenizer, texts, batch_size=BATCH, max_length=32, groups=3, sublayers=True)
    answers = mmlu(model, tokenizer, questions, shots=1, batch_size=3)
    yes_no = boolq(model, tokenizer, items, batch_size=2)
    loss = validation_loss(model, tokenizer, texts[:5], max_length=32, batch_size=BATCH)
    oracle = kit.choose.oracle.ablation_losses(model, tokenizer, texts, ns=[1, 2], max_length=32, batch_size=BATCH)
    greedy = kit.choose.greedy.greedy_removal(model, tokenizer, texts, unit="mlp", steps=2, max_length=32, batch_size=BATCH)
    evals = [metrics.MMLUAccuracy(questions, shots=1, batch_size=3), metrics.ValidationLoss(texts[:5], max_length=32, batch_size=BATCH)]
    config, heal_texts = heal_config(distributed.world_size()), data.corpus("train")[:8]
    healer = sweep.healer(heal_texts, config, output_root=out / "sweep_healed")
    swept = sweep.sweep(model, tokenizer, ns=[0, 2], evals=evals, distances=scan, heal=healer, heal_ns=[2], cache_path=out / "sweep.json")
    interrupted = False
    if interrupt:  # stopped after step 2 (its checkpoint saved), then resumed as a rerun would
        try:
            kit.heal(model, tokenizer, heal_texts, config, output_dir=out / "heal", val_texts=texts[:2], callbacks=[StopBefore(3)])
        except Interrupted:
            interrupted = True
        model = kit.testing.tiny_model("llama", num_layers=4)[0]
    healed = kit.heal(model, tokenizer, heal_texts, config, output_dir=out / "heal", val_texts=texts[:2])
    adapter = {name: p.detach().clone() for name, p in healed.model.named_parameters() if "lora_" in name}
    return dict(
        **{name: {k: getattr(d, k) for k in ("matrix", "stderr", "group_sums", "group_counts")}
           for name, d in (("scan", scan), ("sublayer_scan", sublayer_scan))},  # fmt: skip
        mmlu=dict(predictions=answers.predictions, loglikelihoods=answers.loglikelihoods, accuracy=answers.accuracy),
        boolq=dict(predictions=yes_no.predictions, loglikelihoods=yes_no.loglikelihoods),
        loss=dict(loss=loss.loss, stderr=loss.stderr, tokens=loss.tokens),
        oracle=dict(loss=oracle.loss, kl=oracle.kl, tokens=oracle.meta["tokens"]),
        greedy=dict(order=greedy.order, losses=greedy.losses, candidates=greedy.candidates, tokens=greedy.meta["tokens"]),
        sweep=swept, heal=dict(history=healed.history, adapter=adapter, interrupted=interrupted),
    )


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2:]
    distributed.init()
    if mode == ["short"]:  # the oracle with a text of one token, in rank 1's share (the last batch)
        model, tokenizer, texts, _, _ = inputs()
        kit.choose.oracle.ablation_losses(model, tokenizer, texts[:-1] + ["x"], ns=[1], max_length=32, batch_size=BATCH)
    results = work(out, disagree=mode == ["disagree"], interrupt=True)
    torch.save(results, out / f"rank{distributed.rank()}.pt")
