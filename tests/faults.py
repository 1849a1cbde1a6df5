"""Fault injection: run a workload in a fresh Python process and SIGKILL it (and every process it
started, e.g. a notebook's kernel) at a chosen moment after its imports."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

STARTED = "workload started"
PRELUDE = f"""
import sys
from pathlib import Path

import kit

out = Path(sys.argv[1])
print({STARTED!r}, flush=True)
"""


def run(workload: str, out: Path, *, kill_after: float | None = None) -> float | None:
    """Run `workload` (Python source; `kit` and `out` are defined) with this interpreter and environment.

    Without kill_after: wait for success and return the seconds it ran after its imports. With it:
    SIGKILL the process tree that many seconds after the imports and return None, or return the time
    it took if it finished first."""
    with tempfile.TemporaryFile() as log:
        code = PRELUDE + textwrap.dedent(workload)
        proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)  # fmt: skip
        first = proc.stdout.readline().decode()
        started = time.monotonic()
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            return None
        finally:
            proc.stdout.close()
        if proc.returncode != 0 or first.strip() != STARTED:
            log.seek(0)
            raise RuntimeError(f"workload failed ({proc.returncode}):\n{log.read().decode()[-3000:]}")
        return time.monotonic() - started


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every descendant (a Jupyter kernel has a session of its own)."""
    tree, pids, todo = _children(), [], [pid]
    while todo:
        pids.append(todo.pop())
        todo += tree.get(pids[-1], [])
    os.killpg(pid, signal.SIGKILL)
    for other in pids[1:]:
        try:
            os.kill(other, signal.SIGKILL)
        except ProcessLookupError:
            pass


def debris(folder: Path) -> list[str]:
    """Temporaries of the kit's atomic writes (".name.tmp-..."), anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*.tmp-*"))
