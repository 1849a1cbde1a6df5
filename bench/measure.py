"""Measurements the benchmarks share: CPU or wall time of a call, calls measured in interleaved repeats
and a speed ratio printed with its spread over them, how much the process's peak resident memory
grows during a call (from /proc: Linux only), and running a call in a fresh process, so that memory
freed by earlier steps (kept by the allocator) cannot hide a later step's peak."""

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def wall_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, measure=cpu_seconds) -> dict[str, list]:
    """measure(fn) of every call in `runs`, `repeats` times, interleaved (A, B, A, B, ...): a slow spell of a
    shared machine then falls on every call alike. Returns name -> one measurement per repeat."""
    measured = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            measured[name].append(measure(fn))
    return measured


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each repeat (numerators[i] / denominators[i])."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def spread(per_repeat: Sequence[float], digits: int = 2) -> str:
    """A ratio measured per repeat as its median with the min-max of the repeats: `1.04 (1.02-1.07 over 3 repeats)`."""
    return (f"{statistics.median(per_repeat):.{digits}f} "
            f"({min(per_repeat):.{digits}f}-{max(per_repeat):.{digits}f} over {len(per_repeat)} repeats)")  # fmt: skip


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status: this benchmark measures memory on Linux only")


def peak_growth_mib(fn) -> float:
    """MiB the peak resident size grows above the current one while fn() runs."""
    before = memory_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    fn()
    return memory_mib("VmHWM") - before


def page_in(model) -> None:
    """Read every weight of `model` once: the pages of a memory-mapped checkpoint (safetensors) then count
    in the resident size before a measurement, instead of as growth during its first forward pass."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc's default, fixed: every large block mmapped, freed at once


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned: nothing inherited); its return value. `fn` must be a
    module-level function, its arguments and result picklable. glibc's mmap threshold is fixed there
    (it otherwise rises after frees, and where later blocks land, hence the peak, varies from run to run)."""
    saved = {name: os.environ.get(name) for name in MALLOC_FIXED}
    os.environ.update(MALLOC_FIXED)  # read by the spawned interpreter's allocator at its start
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            return fresh.submit(fn, *args).result()
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
