"""Similarity scan on the embedded model: its cost relative to a plain forward pass over the
same batches (goal <= 1.10), the cost of its uncertainty bookkeeping (standard errors, group sums)
against the same scan keeping only the mean (goal <= 1.05), and its peak memory with 64 vs 512
texts (goal: flat).

Times are CPU seconds of one torch thread, so other jobs on a shared machine do not skew the ratios;
every ratio is taken per repeat of REPEATS interleaved runs and printed as its median with its spread. The scan stops after the last decoder layer, so it is
compared both to the full forward (with the LM head) and to the decoder stack alone
(`model.base_model`); the second ratio is the scan's own overhead (hooks, pairwise distances).
Memory is the peak resident size (VmHWM) of a fresh process, compared with the decoder stack run
over the same batches: the process's allocators grow a little with the number of batches anyway."""

import math
import statistics
from unittest import mock

import torch
import torch.nn.functional as F

import kit
from bench.measure import in_fresh_process, interleaved, peak_growth_mib, ratios, spread
from kit.core.text import encode
from kit.scan import similarity

MODEL = "smollm2-135m"
TIME_TEXTS, TIME_LENGTH, BATCH_SIZE, REPEATS = 24, 128, 8, 3
MEMORY_TEXTS, MEMORY_LENGTH = (64, 512), 32
METRICS = ("angular_last", "angular_all")


@torch.no_grad()
def _forward(module, tokenizer, texts, max_length):
    """A plain forward pass over the scan's batches (tokenization included, as in the scan)."""
    for start in range(0, len(texts), BATCH_SIZE):
        module(**encode(tokenizer, texts[start : start + BATCH_SIZE], max_length=max_length), use_cache=False)


def _mean_only_pair_sums(states, metric, text_of_token, n_texts):
    """The scan's pairwise distances summed over all tokens of the batch, as one row: the work of a
    scan that keeps only the mean (the kit before it measured uncertainty)."""
    total = torch.zeros(1, len(states), len(states), dtype=torch.float64)
    for start in range(0, len(states[0]), similarity._TOKEN_CHUNK):
        unit = F.normalize(torch.stack([state[start : start + similarity._TOKEN_CHUNK] for state in states]).double(), dim=-1)
        cos = torch.einsum("ptd,qtd->tpq", unit, unit).clamp_(-1.0, 1.0)
        total[0] += (1.0 - cos if metric == "block_influence" else torch.arccos(cos) / math.pi).sum(0)
    return total


def _mean_only_add(self, first_text, sums, counts):
    self.tensors["group_sums"][0] += sums[0]
    self.tensors["group_counts"][0] += counts.sum()


def _mean_only_scan(model, tokenizer, texts, metric):
    with mock.patch.object(similarity, "_pair_sums", _mean_only_pair_sums), mock.patch.object(similarity._Sums, "add", _mean_only_add):
        kit.angular_distances(model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=TIME_LENGTH, metric=metric)


def time_ratios():
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.loaders.data.load_texts("corpus", "train", TIME_TEXTS)
    runs = {
        "forward": lambda: _forward(model, tokenizer, texts, TIME_LENGTH),
        "decoder stack": lambda: _forward(model.base_model, tokenizer, texts, TIME_LENGTH),
        **{
            metric: lambda metric=metric: kit.angular_distances(
                model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=TIME_LENGTH, metric=metric
            )
            for metric in METRICS
        },
        **{f"{metric} mean only": lambda metric=metric: _mean_only_scan(model, tokenizer, texts, metric) for metric in METRICS},
    }
    _forward(model, tokenizer, texts[:BATCH_SIZE], TIME_LENGTH)  # warm-up
    seconds = interleaved(runs, REPEATS)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"CPU time on one thread, {TIME_TEXTS} texts x {TIME_LENGTH} tokens, batch {BATCH_SIZE}, medians of {REPEATS} interleaved repeats:")
    print(f"  plain forward {median['forward']:.2f} s, decoder stack alone {median['decoder stack']:.2f} s")
    for metric in METRICS:
        print(
            f"  scan {metric:<13} {median[metric]:.2f} s   scan / forward {spread(ratios(seconds[metric], seconds['forward']), 3)} "
            f"(goal <= 1.10), scan / decoder stack {spread(ratios(seconds[metric], seconds['decoder stack']), 3)}"
        )
    for metric in METRICS:
        overhead = spread(ratios(seconds[metric], seconds[f"{metric} mean only"]), 3)
        print(f"  uncertainty, {metric:<13}: scan / scan keeping only the mean {overhead} (goal <= 1.05)")


def _peak_growth(job: str, n_texts: int) -> float:
    """MiB the peak resident size grows while `job` ("scan" or "decoder stack") runs over n_texts,
    in this fresh process, after a warm-up batch."""
    torch.set_num_threads(1)
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.loaders.data.load_texts("mmlu", n=n_texts)

    def run(batch):
        if job == "scan":
            kit.angular_distances(model, tokenizer, batch, batch_size=BATCH_SIZE, max_length=MEMORY_LENGTH)
        else:
            _forward(model.base_model, tokenizer, batch, MEMORY_LENGTH)

    run(texts[:BATCH_SIZE])
    return peak_growth_mib(lambda: run(texts))


def memory_ratio():
    growth = {}
    for job in ("decoder stack", "scan"):
        for n_texts in MEMORY_TEXTS:
            growth[job, n_texts] = in_fresh_process(_peak_growth, job, n_texts)
    small, large = MEMORY_TEXTS
    print(f"peak resident memory growth (VmHWM, fresh process each), MMLU texts x {MEMORY_LENGTH} tokens:")
    for job in ("decoder stack", "scan"):
        print(f"  {job:<13}: {small} texts +{growth[job, small]:.1f} MiB, {large} texts +{growth[job, large]:.1f} MiB")
    extra = {n: growth["scan", n] - growth["decoder stack", n] for n in MEMORY_TEXTS}
    print(f"  scan beyond the decoder stack: {small} texts {extra[small]:+.1f} MiB, {large} texts {extra[large]:+.1f} MiB (goal: flat)")


def main():
    time_ratios()
    memory_ratio()


if __name__ == "__main__":
    main()
