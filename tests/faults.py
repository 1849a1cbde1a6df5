"""Fault injection: run a workload in a fresh process and SIGKILL it (and every process it started,
e.g. a notebook's kernel) at a chosen moment after its imports.

Workloads are forked from one multiprocessing fork server that has already imported torch,
transformers, peft and the kit: each run starts in milliseconds, and a kill lands in the workload's
own work rather than in its imports."""

import multiprocessing
import os
import signal
import tempfile
import textwrap
import time
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "kit.testing", "kit.similarity", "kit.healing", "kit.sweep", "kit.reports"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, at the first run
    return context


def _workload(source: str, out: str, log: str, started) -> None:
    """In the forked child: a session of its own (so its process group can be killed), output to `log`."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import kit

    started.send(True)
    exec(compile(source, "<workload>", "exec"), {"__name__": "__workload__", "kit": kit, "out": Path(out)})


def run(workload: str, out: Path, *, kill_after: float | None = None) -> float | None:
    """Run `workload` (Python source; `kit` and `out` are defined) in a fresh forked process.

    Without kill_after: wait for success and return the seconds it ran. With it: SIGKILL the process
    tree that many seconds after it started and return None, or return the time it took if it
    finished first."""
    context = _context()
    with tempfile.NamedTemporaryFile() as log:
        started, child_end = context.Pipe(duplex=False)
        proc = context.Process(target=_workload, args=(textwrap.dedent(workload), str(out), log.name, child_end))
        proc.start()
        child_end.close()
        try:
            started.recv()
        except EOFError:  # the child died before its workload began
            pass
        started.close()
        begun = time.monotonic()
        proc.join(kill_after)
        if proc.exitcode is None:
            _kill_tree(proc.pid)
            proc.join()
            if proc.exitcode == -signal.SIGKILL:
                return None
        if proc.exitcode != 0:
            raise RuntimeError(f"workload failed ({proc.exitcode}):\n{Path(log.name).read_text()[-3000:]}")
        return time.monotonic() - begun


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
    for kill, target in [(os.killpg, pid)] + [(os.kill, other) for other in pids[1:]]:
        try:
            kill(target, signal.SIGKILL)
        except ProcessLookupError:  # it ended by itself between the wait and the kill (the fork server reaps it)
            pass


def debris(folder: Path) -> list[str]:
    """Temporaries of the kit's atomic writes (".name.tmp-..."), anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*.tmp-*"))
