"""The greedy removal (kit.choose.greedy.greedy_removal) against the brute-force greedy loop that rebuilds each
candidate model and scores it (kit.testing.reference_greedy: drop_layers, or a deep copy with the
branch zeroed, then validation_loss) on the same tiny model and texts, for whole layers, attention and MLP
branches: the CPU-time ratio (goal <= 0.5).

Times are CPU seconds of one torch thread; the two run in turn REPEATS times and the ratio is taken
per repeat, printed as its median with its spread (as in bench_oracle)."""

import statistics

import torch

import kit
from bench.measure import interleaved, ratios, spread
from kit.testing import reference_greedy

LAYERS, STEPS, TEXTS, LENGTH, BATCH_SIZE, REPEATS = 12, 4, 8, 64, 8, 3
UNITS = ("layers", "attention", "mlp")


def main():
    torch.set_num_threads(1)
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=LAYERS)
    texts = kit.loaders.data.load_texts("corpus", "validation", TEXTS)
    settings = dict(steps=STEPS, max_length=LENGTH, batch_size=BATCH_SIZE)
    print(f"CPU time on one thread, tiny llama of {LAYERS} layers, {STEPS} greedy steps, {TEXTS} texts x {LENGTH} tokens, "
          f"medians of {REPEATS} interleaved repeats:")  # fmt: skip
    for unit in UNITS:
        runs = {"greedy": lambda: kit.choose.greedy.greedy_removal(model, tokenizer, texts, unit=unit, **settings),  # noqa: B023
                "brute": lambda: reference_greedy(model, tokenizer, texts, unit=unit, **settings)}  # noqa: B023  # fmt: skip
        seconds = interleaved(runs, REPEATS)
        print(f"  {unit}: greedy_removal {statistics.median(seconds['greedy']):.2f} s, brute-force loop "
              f"{statistics.median(seconds['brute']):.2f} s; greedy / brute force: "
              f"{spread(ratios(seconds['greedy'], seconds['brute']))} (goal <= 0.5)")  # fmt: skip


if __name__ == "__main__":
    main()
