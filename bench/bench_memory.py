"""Peak memory of the kit's default paths against the full-copy / full-logits way of doing the same
job, on the embedded model on CPU: growth of the process's resident memory over each step,
sampled every few milliseconds. Same inputs, same results (printed beside the memory)."""

import copy
import gc
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

import kit
from kit import evaluate, scoring
from kit.data import mmlu_questions
from kit.healing import lora_model
from kit.merge import merge_adapter
from kit.mmlu import mmlu_prompt
from kit.text import encode

MODEL = "smollm2-135m"


@contextmanager
def peak_growth(record: list):
    """Append the peak growth of resident memory (MiB) during the block to `record`."""
    gc.collect()
    process, stop = psutil.Process(), threading.Event()
    start = peak = process.memory_info().rss

    def sample():
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        record.append((max(peak, process.memory_info().rss) - start) / 2**20)


def full_logits_loss(model, tokenizer, texts, max_length):
    """The usual way: [B, T, V] logits, in fp32, then the cross-entropy."""
    enc = encode(tokenizer, texts, max_length=max_length)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100).item()


def copied_prefix_forward(model, rows, keep, prefix_cache, prefix_len):
    """The usual way to extend a shared prefix: a deep copy of its cache, repeated per row."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(len(rows))
    ids, mask = scoring._right_pad(rows, model.device)
    mask = torch.cat([mask.new_ones(len(rows), prefix_len), mask], dim=1)
    positions = torch.arange(prefix_len, prefix_len + ids.shape[1]).expand(len(rows), -1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=keep).logits


def compare(label, kit_step, usual_step):
    kit_peak, usual_peak = [], []
    with peak_growth(kit_peak):
        ours = kit_step()
    with peak_growth(usual_peak):
        theirs = usual_step()
    print(f"  {label:44s} {kit_peak[0]:7.0f} MiB vs {usual_peak[0]:7.0f} MiB   ratio {kit_peak[0] / usual_peak[0]:.2f}   "
          f"results {ours} / {theirs}")  # fmt: skip


def main():
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    print(f"peak memory growth, {MODEL} on CPU: the kit's path vs the usual one (lower is better)")
    texts = kit.data.corpus("validation")[:16]
    compare(
        "validation loss, 16 texts x 512 tokens",
        lambda: round(evaluate.validation_loss(model, tokenizer, texts, max_length=512, batch_size=16).loss, 5),
        lambda: round(full_logits_loss(model, tokenizer, texts, 512), 5),
    )

    questions = mmlu_questions("high_school_geography", per_subject=16)
    shots = kit.data.mmlu_fewshot_pool("high_school_geography")
    requests = [scoring.encode_request(tokenizer, mmlu_prompt(q, shots), f" {c}") for q in questions for c in "ABCD"]
    scores = lambda: round(sum(scoring.loglikelihoods(model, requests, batch_size=16)), 3)  # noqa: E731
    kit_forward = scoring._forward
    scoring_usual = lambda: (setattr(scoring, "_forward", copied_prefix_forward), scores())[1]  # noqa: E731
    try:
        compare("MMLU 5-shot, 16 questions in one batch", scores, scoring_usual)
    finally:
        scoring._forward = kit_forward

    block = kit.Block(10, 10)
    layers_in = lambda m: kit.layers.num_layers(m)  # noqa: E731

    def view():
        with kit.dropped(model, block):
            return layers_in(model)

    compare("a pruned model (10 of 30 layers removed)", view, lambda: layers_in(kit.drop_layers(model, block)))

    with tempfile.TemporaryDirectory() as tmp:
        tmp, base = Path(tmp), Path(tmp) / "base"
        model.save_pretrained(base, max_shard_size="100MB")  # shards as a large checkpoint has them (5 GB each at 70B)
        tokenizer.save_pretrained(base)
        adapted = lora_model(kit.load_model(str(base))[0], kit.HealConfig(rank=8, quantize=None, gradient_checkpointing=False))
        adapted.save_pretrained(tmp / "adapter")
        del adapted

        def in_memory():
            from peft import PeftModel

            merged = PeftModel.from_pretrained(kit.load_model(str(base))[0], str(tmp / "adapter")).merge_and_unload()
            merged.save_pretrained(tmp / "in_memory", max_shard_size="100MB")
            return len(list((tmp / "in_memory").glob("*.safetensors")))

        streamed = lambda: len(list(merge_adapter(base, tmp / "adapter", tmp / "streamed").glob("*.safetensors")))  # noqa: E731
        compare("merging a LoRA adapter (base in 100 MB shards)", streamed, in_memory)


if __name__ == "__main__":
    main()
