"""Similarity scan on the embedded model: its time relative to a plain forward pass over the
same batches (goal <= 1.10), and its peak memory with 64 vs 512 texts (goal: flat).

The scan stops after the last decoder layer, so it is compared both to the full forward (with the
LM head) and to the decoder stack alone (`model.base_model`): the second ratio is the scan's own
overhead (hooks and pairwise distances)."""

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import kit
from kit.data import encode

MODEL = "smollm2-135m"
TIME_TEXTS, TIME_LENGTH, BATCH_SIZE, REPEATS = 24, 128, 8, 3
MEMORY_TEXTS, MEMORY_LENGTH = (64, 512), 32


@torch.no_grad()
def _forward(module, tokenizer, texts):
    """A plain forward pass over the scan's batches (tokenization included, as in the scan)."""
    for start in range(0, len(texts), BATCH_SIZE):
        enc = encode(tokenizer, texts[start : start + BATCH_SIZE], max_length=TIME_LENGTH, padding_side="right")
        module(**enc, use_cache=False)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_ratios():
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.data.load_texts("corpus", "train", TIME_TEXTS)
    runs = {
        "forward": lambda: _forward(model, tokenizer, texts),
        "layers": lambda: _forward(model.base_model, tokenizer, texts),
        **{
            metric: lambda metric=metric: kit.angular_distances(
                model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=TIME_LENGTH, metric=metric
            )
            for metric in ("angular_last", "angular_all")
        },
    }
    _forward(model, tokenizer, texts[:BATCH_SIZE])  # warm-up
    best = {name: float("inf") for name in runs}
    for _ in range(REPEATS):  # interleaved, best of REPEATS: robust to a busy machine
        for name, fn in runs.items():
            best[name] = min(best[name], _seconds(fn))
    print(f"time, {TIME_TEXTS} texts x {TIME_LENGTH} tokens, batch {BATCH_SIZE}, best of {REPEATS}:")
    print(f"  plain forward {best['forward']:.2f} s, decoder stack alone {best['layers']:.2f} s")
    for metric in ("angular_last", "angular_all"):
        print(
            f"  scan {metric:<13} {best[metric]:.2f} s   scan / forward {best[metric] / best['forward']:.3f} "
            f"(goal <= 1.10), scan / decoder stack {best[metric] / best['layers']:.3f}"
        )


def _memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status: this benchmark measures memory on Linux only")


def _scan_peak(n_texts: int) -> tuple[float, float]:
    """(resident MiB before the scan, peak MiB during it), in a fresh process, after a warm-up batch."""
    model, tokenizer = kit.load_model(MODEL)
    texts = kit.data.load_texts("mmlu", n=n_texts)
    kit.angular_distances(model, tokenizer, texts[:BATCH_SIZE], batch_size=BATCH_SIZE, max_length=MEMORY_LENGTH)
    before = _memory_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    kit.angular_distances(model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=MEMORY_LENGTH)
    return before, _memory_mib("VmHWM")


def memory_ratio():
    peaks = {}
    for n_texts in MEMORY_TEXTS:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            peaks[n_texts] = fresh.submit(_scan_peak, n_texts).result()
    small, large = MEMORY_TEXTS
    print(f"peak resident memory during the scan (VmHWM, fresh process each), MMLU texts x {MEMORY_LENGTH} tokens:")
    for n_texts, (before, peak) in peaks.items():
        print(f"  {n_texts:>4} texts: {before:.0f} MiB before, peak {peak:.0f} MiB (+{peak - before:.1f} MiB)")
    print(f"  peak {large} / {small} texts: {peaks[large][1] / peaks[small][1]:.3f} (goal 1.00, flat)")


def main():
    time_ratios()
    memory_ratio()


if __name__ == "__main__":
    main()
