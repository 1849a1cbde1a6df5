"""The ablation oracle on the embedded model: its cost relative to the naive loop that rebuilds
each pruned model and scores it (validation_loss(drop_layers(model, block))) over the same blocks
(goal <= 0.75), and its peak memory with 1 vs 4 batches of texts (goal: flat, one batch's states).

Times are CPU seconds of one torch thread, so other jobs on a shared machine do not skew the
ratio. Memory is the peak resident size (VmHWM) growth of a fresh process, as in bench_scan."""


import torch

import kit
from bench.measure import cpu_seconds, in_fresh_process, peak_growth_mib
from kit.evaluate import validation_loss
from kit.prune import Block, drop_layers

MODEL = "smollm2-135m"
NS = (2, 15, 28)  # short, middle and long blocks: 48 blocks of the 30-layer model
TEXTS, LENGTH, BATCH_SIZE = 2, 64, 2
MEMORY_BATCHES = (1, 4)


def time_ratio():
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.data.load_texts("corpus", "validation", TEXTS)
    L = kit.layers.num_layers(model)
    blocks = [Block(start, n) for n in NS for start in range(L - n + 1)]

    def naive():
        for block in blocks:
            validation_loss(drop_layers(model, block), tokenizer, texts, max_length=LENGTH, batch_size=BATCH_SIZE)

    oracle = cpu_seconds(lambda: kit.ablation_losses(model, tokenizer, texts, ns=NS, max_length=LENGTH, batch_size=BATCH_SIZE))
    loop = cpu_seconds(naive)
    print(f"CPU time on one thread, {len(blocks)} blocks (n in {NS}), {TEXTS} texts x {LENGTH} tokens:")
    print(f"  oracle {oracle:.1f} s, naive validation_loss(drop_layers(...)) loop {loop:.1f} s")
    print(f"  oracle / naive loop: {oracle / loop:.2f} (goal <= 0.75)")


def _peak_growth(batches: int) -> float:
    """MiB the peak resident size grows while the oracle runs over `batches` batches (fresh process, after a warm-up)."""
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.data.load_texts("corpus", "validation", batches * BATCH_SIZE)

    def run(batch):
        kit.ablation_losses(model, tokenizer, batch, ns=(28,), max_length=LENGTH, batch_size=BATCH_SIZE)

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
