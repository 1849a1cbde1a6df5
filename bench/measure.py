"""Measurements the benchmarks share: CPU time of a call, and how much the process's peak resident
memory grows during a call (from /proc: Linux only)."""

import time
from pathlib import Path


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


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
