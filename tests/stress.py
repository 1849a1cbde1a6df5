"""Run a test file many times in a row while CPU-bound processes compete for every core, to show that
it does not flake under load: `python tests/stress.py faults --runs 20` (tests/test_faults.py).

Each run's pytest summary is printed as it ends, then the tally; exits non-zero if any run failed."""

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    while True:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/stress.py", description=__doc__)
    parser.add_argument("suite", help="a test file's name: faults runs tests/test_faults.py")
    parser.add_argument("--runs", type=int, default=20, help="how many times in a row")
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="CPU-bound processes competing (default: one per core)")
    args = parser.parse_args(argv)
    test_file = ROOT / "tests" / f"test_{args.suite}.py"
    if not test_file.exists():
        parser.error(f"{test_file} does not exist")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    failed = 0
    try:
        for run in range(1, args.runs + 1):
            began = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider"],
                                  cwd=ROOT, capture_output=True, text=True)  # fmt: skip
            summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
            failed += done.returncode != 0
            print(f"run {run}/{args.runs} ({time.monotonic() - began:.0f} s, load average {os.getloadavg()[0]:.1f}): {summary}", flush=True)
            if done.returncode != 0:
                print(done.stdout[-4000:], flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"{args.runs - failed} runs passed, {failed} failed, with {args.load} CPU-bound processes competing on {os.cpu_count()} cores")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
