"""Peak memory of the kit's default paths against the full-copy / full-logits way of doing the same
job, on the embedded model on CPU. Each side of each comparison runs in a fresh process that loads the
model, prepares its inputs, then measures the growth of its peak resident size (VmHWM) over the one
step: no earlier step's freed memory can hide a peak, and the weights' pages are read in before it. Same
inputs, same results (printed beside)."""

import copy
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import kit
from bench.measure import in_fresh_process, page_in, peak_growth_mib
from kit import evaluate
from kit.core.text import encode
from kit.evaluate import scoring
from kit.evaluate.mmlu_task import mmlu_prompt
from kit.healing.lora import lora_model
from kit.healing.merge import merge_adapter
from kit.loaders.data import mmlu_questions
from kit.scan import similarity

MODEL = "smollm2-135m"


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


def validation_loss(model, tokenizer, folder):
    texts = kit.loaders.data.corpus("validation")[:16]
    kit_step = lambda: round(evaluate.validation_loss(model, tokenizer, texts, max_length=512, batch_size=16).loss, 5)  # noqa: E731
    return kit_step, lambda: round(full_logits_loss(model, tokenizer, texts, 512), 5)


def mmlu_batch(model, tokenizer, folder):
    questions = mmlu_questions("high_school_geography", per_subject=16)
    shots = kit.loaders.data.mmlu_fewshot_pool("high_school_geography")
    requests = [scoring.encode_request(tokenizer, mmlu_prompt(q, shots), f" {c}") for q in questions for c in "ABCD"]
    scores = lambda: round(sum(scoring.loglikelihoods(model, requests, batch_size=16)), 3)  # noqa: E731
    return scores, lambda: (setattr(scoring, "_forward", copied_prefix_forward), scores())[1]


def pruned_model(model, tokenizer, folder):
    block = kit.Block(10, 10)

    def view():
        with kit.prune.dropped(model, block):
            return kit.core.layers.num_layers(model)

    return view, lambda: kit.core.layers.num_layers(kit.drop_layers(model, block))


def merge(model, tokenizer, folder):
    def in_memory():
        from peft import PeftModel

        merged = PeftModel.from_pretrained(kit.load_model(str(folder / "base"))[0], str(folder / "adapter")).merge_and_unload()
        merged.save_pretrained(folder / "in_memory", max_shard_size="100MB")
        return len(list((folder / "in_memory").glob("*.safetensors")))

    streamed = lambda: len(list(merge_adapter(folder / "base", folder / "adapter", folder / "streamed").glob("*.safetensors")))  # noqa: E731
    return streamed, in_memory


def float64_cosines(states, text_of_token, n_texts):
    """The usual way: the states copied to float64 and normalised, then every pair's cosine at once."""
    unit = F.normalize(torch.stack(states).double(), dim=-1)
    distance = torch.arccos(torch.einsum("ptd,qtd->tpq", unit, unit).clamp(-1.0, 1.0)) / math.pi
    return torch.zeros(n_texts, len(states), len(states), dtype=torch.float64).index_add_(0, text_of_token, distance)


def scan_cosines(model, tokenizer, folder):
    """The scan's pairwise distances over one chunk at Llama-2-7B's size (random residual states)."""
    torch.manual_seed(0)
    states = [torch.randn(similarity._TOKEN_CHUNK, 4096) for _ in range(33)]
    texts = torch.arange(similarity._TOKEN_CHUNK) % 4
    total = lambda sums: round(sums.sum().item(), 3)  # noqa: E731  (the two orders of float64 sums differ by 1e-10 per pair)
    return (lambda: total(similarity._pair_sums(states, "angular_all", texts, 4)),
            lambda: total(float64_cosines(states, texts, 4)))  # fmt: skip


COMPARISONS = {  # label: the two steps (the kit's, the usual one), built on the loaded model
    "validation loss, 16 texts x 512 tokens": validation_loss,
    "MMLU 5-shot, 16 questions in one batch": mmlu_batch,
    "a pruned model (10 of 30 layers removed)": pruned_model,
    "merging a LoRA adapter (base in 100 MB shards)": merge,
    "scan distances, 1,024 tokens x 33 positions x 4,096": scan_cosines,
}


def measure(label: str, side: int, folder: str):
    """In a fresh process: load the model (every page of it), build `label`'s steps, run step `side` (0: the
    kit's, 1: the usual); (its result, the growth of the peak resident size in MiB)."""
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    page_in(model)
    step = COMPARISONS[label](model, tokenizer, Path(folder))[side]
    result = []
    return result, peak_growth_mib(lambda: result.append(step()))


def main(labels=tuple(COMPARISONS)):
    print(f"peak memory growth, {MODEL} on CPU, each side in a fresh process: the kit's path vs the usual one (lower is better)")
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = kit.load_model(MODEL)
        model.save_pretrained(Path(folder) / "base", max_shard_size="100MB")  # shards as a large checkpoint has them
        tokenizer.save_pretrained(Path(folder) / "base")
        adapted = lora_model(model, kit.HealConfig(rank=8, quantize=None, gradient_checkpointing=False))
        adapted.save_pretrained(Path(folder) / "adapter")
        del model, adapted
        for label in labels:
            (ours, kit_mib), (theirs, usual_mib) = (in_fresh_process(measure, label, side, folder) for side in (0, 1))
            print(f"  {label:48s} {kit_mib:7.0f} MiB vs {usual_mib:7.0f} MiB   ratio {kit_mib / usual_mib:.3f}   "
                  f"results {ours[0]} / {theirs[0]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:] or tuple(COMPARISONS))
