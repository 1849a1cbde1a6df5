"""kit.experiments.reports times each notebook: wall time, and CPU time that includes the kernel (a child process)."""

import subprocess
import sys

from kit.experiments.reports import minutes, timed


def test_timed_counts_the_cpu_of_finished_children():
    times = []
    with timed(times):
        busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
        subprocess.run([sys.executable, "-c", busy], check=True)
    ((wall, cpu),) = times
    assert cpu >= 0.5 and wall > 0  # the child's half second of CPU is counted


def test_minutes():
    assert minutes(1101.4) == "18 min 21 s" and minutes(59.6) == "1 min 0 s"
