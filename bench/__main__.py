"""`make bench`: run every bench/bench_*.py module's main() in turn; each prints ratios
measured within one run (never absolute timings compared across machines).

Always on the CPU, also on a machine with a GPU: the benchmarks time with CPU seconds and measure the
process's resident memory, which say nothing of work done on a GPU (`make gpu-check` measures GPUs).
main() pins the CPU (cpu_only) before any bench module imports the kit; a module run alone
(`python -m bench.bench_memory`) follows the kit's device policy instead: set KIT_DEVICE=cpu."""

import importlib
import os
import pkgutil

import bench

CPU_ONLY = {"KIT_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # the kit's policy, and torch / the HF Trainer see no GPU


def cpu_only() -> None:
    """Pin this process and those it starts (torchrun, spawned measurements) to the CPU. CUDA_VISIBLE_DEVICES
    takes effect only before CUDA is first used, as here before the benchmarks import anything."""
    os.environ.update(CPU_ONLY)


def main():
    cpu_only()
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
