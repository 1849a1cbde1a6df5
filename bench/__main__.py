"""`make bench`: run every bench/bench_*.py module's main() in turn; each prints ratios
measured within one run (never absolute timings compared across machines)."""

import importlib
import pkgutil

import bench


def main():
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
