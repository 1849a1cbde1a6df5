"""The ablation oracle on the embedded model: its cost relative to the naive loop that rebuilds
each pruned model and scores it (validation_loss(drop_layers(model, block))) over the same blocks
(goal <= 0.75), and its peak memory with 1 vs 4 batches of texts (goal: flat, one batch's states).

Times are CPU seconds of one torch thread, so other jobs on a shared machine do not skew the
ratio; the two run in turn REPEATS times, and the ratio is taken per repeat and printed as its median
with its spread. Blocks of 14, 21 and 28 layers (30 blocks; 2, 15 and 28 used to give 48 blocks, run
once) keep three repeats at about the time one cost. Memory is the peak resident size (VmHWM) growth
of a fresh process, as in bench_scan."""

import statistics

import torch

import kit
from bench.measure import in_fresh_process, interleaved, peak_growth_mib, ratios, spread
from kit.core.block import Block
from kit.evaluate import validation_loss
from kit.prune import drop_layers

MODEL = "smollm2-135m"
NS = (14, 21, 28)  # blocks of three lengths: 30 blocks of the 30-layer model
TEXTS, LENGTH, BATCH_SIZE, REPEATS = 2, 64, 2, 3
MEMORY_BATCHES = (1, 4)


def time_ratio():
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.loaders.data.load_texts("corpus", "validation", TEXTS)
    L = kit.core.layers.num_layers(model)
    blocks = [Block(start, n) for n in NS for start in range(L - n + 1)]

    def naive():
        for block in blocks:
            validation_loss(drop_layers(model, block), tokenizer, texts, max_length=LENGTH, batch_size=BATCH_SIZE)

    def oracle():
        kit.choose.oracle.ablation_losses(model, tokenizer, texts, ns=NS, max_length=LENGTH, batch_size=BATCH_SIZE)

    seconds = interleaved({"oracle": oracle, "naive": naive}, REPEATS)
    print(f"CPU time on one thread, {len(blocks)} blocks (n in {NS}), {TEXTS} texts x {LENGTH} tokens, "
          f"medians of {REPEATS} interleaved repeats:")  # fmt: skip
    print(f"  oracle {statistics.median(seconds['oracle']):.1f} s, "
          f"naive validation_loss(drop_layers(...)) loop {statistics.median(seconds['naive']):.1f} s")  # fmt: skip
    print(f"  oracle / naive loop: {spread(ratios(seconds['oracle'], seconds['naive']))} (goal <= 0.75)")


def _peak_growth(batches: int) -> float:
    """MiB the peak resident size grows while the oracle runs over `batches` batches (fresh process, after a warm-up)."""
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.loaders.data.load_texts("corpus", "validation", batches * BATCH_SIZE)

    def run(batch):
        kit.choose.oracle.ablation_losses(model, tokenizer, batch, ns=(28,), max_length=LENGTH, batch_size=BATCH_SIZE)

    run(texts[:BATCH_SIZE])
    return peak_growth_mib(lambda: run(texts))


def memory_ratio():
    growth = {}
    for batches in MEMORY_BATCHES:
        growth[batches] = in_fresh_process(_peak_growth, batches)
    cells = ", ".join(f"{b} batch{'es' if b > 1 else ''} +{growth[b]:.1f} MiB" for b in MEMORY_BATCHES)
    print(f"peak resident memory growth of the oracle (VmHWM, fresh process each), batches of {BATCH_SIZE} x {LENGTH} tokens:")
    print(f"  {cells} (goal: flat)")


def main():
    time_ratio()
    memory_ratio()


if __name__ == "__main__":
    main()
