"""Fault injection: run a workload in a fresh process and SIGKILL it, with every process it started,
just before a given write point, or at a chosen moment.

A write is any file-system change under the watched folder: what Python's audit events show (an open
for writing, a rename or replace, a removal, a new folder) and the writers written in C, C++ or Rust
that they do not show (`torch.save`, safetensors, the kit's atomic folder swap
`kit.core.artifacts._exchange`). Its write point is its kind and path, less the numbers in the path (steps,
batches, process ids) and the random part of a temporary's name. A crash point is a write, not a
moment: it stops a run at the same place whatever the machine's load.

Workloads are forked from one multiprocessing fork server that has already imported torch,
transformers, peft, the kit and IPython: each run starts in milliseconds, a notebook's too
(run_notebook)."""

import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "kit.testing", "kit.scan.similarity", "kit.healing.train", "kit.experiments.sweep", "kit.experiments.plots",
           "IPython.core.interactiveshell", "papermill.iorw", "papermill.parameterize"]  # fmt: skip
CRASH_BEFORE, WATCH, LOG, ROOT = "KIT_CRASH_BEFORE", "KIT_CRASH_WATCH", "KIT_CRASH_LOG", "KIT_CRASH_ROOT"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.link", "os.symlink"}


# ---------------------------------------------------------------------------- inside the workload


def arm() -> None:
    """Log the workload's writes under $KIT_CRASH_WATCH; kill it before its first write at point $KIT_CRASH_BEFORE."""
    if WATCH not in os.environ:
        return
    import safetensors.torch
    import torch

    import kit.core.artifacts

    watched = os.path.realpath(os.environ[WATCH]) + os.sep
    crash_before, root = os.environ[CRASH_BEFORE], int(os.environ[ROOT])

    def write_point(kind: str, *paths) -> None:
        """One write to any of `paths` (a rename names two): numbered and logged if under the watched folder."""
        inside = [p for p in map(_path, paths) if p and p.startswith(watched)]
        if not inside:
            return
        write = f"{kind}\t{inside[-1][len(watched):]}"
        _append(os.environ[LOG], f"{write}\n".encode())
        if point(write) == crash_before:
            kill_tree(root)

    def audit(event: str, args) -> None:
        if event == "open" and (args[2] or 0) & WRITE_FLAGS:
            write_point(event, args[0])
        elif event == "os.mkdir" and os.path.isdir(args[0]):  # exist_ok: nothing changes
            return
        elif event in PATH_EVENTS:
            write_point(event, *args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1])

    def crash_point(write, target):
        def wrapped(*args, **kwargs):
            write_point(write.__qualname__, target(*args, **kwargs))
            return write(*args, **kwargs)

        return wrapped

    torch.save = crash_point(torch.save, lambda obj, f, *a, **k: f)
    safetensors.torch.serialize_file = crash_point(safetensors.torch.serialize_file, lambda tensors, filename, *a, **k: filename)
    kit.core.artifacts._exchange = crash_point(kit.core.artifacts._exchange, lambda a, b: b)
    sys.addaudithook(audit)


def _path(path) -> str | None:
    return os.path.realpath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else None


def _append(file: str, data: bytes) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _tree(pid: int) -> list[int]:
    """`pid` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, todo = [], [pid]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def kill_tree(root: int) -> None:
    """SIGKILL `root`, its process group and every descendant (a Jupyter kernel has a session of its
    own); the calling process last if it is one of them. A process that already ended is no error."""
    me, pids = os.getpid(), _tree(root)
    kills = [(os.kill, pid) for pid in pids if pid != me] + [(os.killpg, root)] + [(os.kill, me)] * (me in pids)
    for kill, target in kills:
        try:
            kill(target, signal.SIGKILL)
        except ProcessLookupError:  # it ended by itself meanwhile (the fork server reaps it)
            pass


# ---------------------------------------------------------------------------- the harness


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, at the first run
    return context


def _workload(source: str, out: str, log: str, started, env: dict) -> None:
    """In the forked child: a session of its own (so its process group can be killed), output to `log`."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env, **{ROOT: str(os.getpid())})
    import kit

    arm()
    started.send(True)
    exec(compile(source, "<workload>", "exec"), {"__name__": "__workload__", "kit": kit, "out": Path(out)})


def run(workload: str, out: Path, *, crash_before: str = "", watch: Path | None = None, kill_after: float | None = None):
    """Run `workload` (Python source; `kit` and `out` are defined) in a fresh forked process.

    Args:
        crash_before: kill its process tree just before its first write at this write point (see point()).
        watch: the folder whose writes are logged (default `out`).
        kill_after: kill it this many seconds after it started.

    Returns (finished, writes): whether it ran to its end (False: it was killed), and its writes in order,
    each "kind<TAB>path under watch" (after a crash point, the last one is the write it was killed before).
    """
    context = _context()
    with tempfile.TemporaryDirectory() as scratch:
        files = {name: Path(scratch) / name for name in ("output", "writes")}
        for file in files.values():
            file.touch()
        env = {CRASH_BEFORE: crash_before, WATCH: str(watch or out), LOG: str(files["writes"])}
        started, child_end = context.Pipe(duplex=False)
        args = (textwrap.dedent(workload), str(out), str(files["output"]), child_end, env)
        proc = context.Process(target=_workload, args=args)
        proc.start()
        child_end.close()
        try:
            started.recv()
        except EOFError:  # the child died before its workload began
            pass
        started.close()
        proc.join(kill_after)
        if proc.exitcode is None:
            kill_tree(proc.pid)
            proc.join()
        writes = files["writes"].read_text().splitlines()
        if proc.exitcode == -signal.SIGKILL:
            return False, writes
        if proc.exitcode != 0:
            raise RuntimeError(f"workload failed ({proc.exitcode}):\n{files['output'].read_text()[-3000:]}")
        return True, writes


def point(write: str) -> str:
    """The write point of a write: its kind and path, less its numbers (steps, batches, process ids) and
    the random part of a temporary's name."""
    return re.sub(r"\d+", "N", re.sub(r"\.tmp-[^/]*", ".tmp-*", write))


def write_points(writes: list[str]) -> list[str]:
    """The distinct write points of `writes`, in the order first reached: a loop of a thousand
    checkpoints or batches has the write points of one."""
    return list(dict.fromkeys(map(point, writes)))


def run_notebook(path: Path, parameters: dict) -> None:
    """Execute the notebook at `path` in this process, its parameters injected as papermill injects them
    and its code cells run in turn by an IPython shell (the interpreter a kernel runs): the same code in
    milliseconds instead of a kernel's seconds of start-up, for workloads run dozens of times."""
    from IPython.core.interactiveshell import InteractiveShell
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    from traitlets.config import Config

    notebook = parameterize_notebook(load_notebook_node(str(path)), parameters, kernel_name="python3", language="python")
    settings = Config()
    settings.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=settings)
    os.chdir(Path(path).parent)  # papermill's cwd
    for cell in notebook.cells:
        if cell.cell_type == "code":
            shell.run_cell(cell.source).raise_error()


def timed_kill(workload: str, out: Path, *, within: float, rng) -> float:
    """Kill `workload` at a random moment in [0, within) s of its run, drawn again earlier (from a fresh
    `out`) until a kill lands before the workload ends; returns that moment."""
    at = rng.uniform(0, within)
    while run(workload, out, kill_after=at)[0]:
        shutil.rmtree(out, ignore_errors=True)
        at = rng.uniform(0, at)
    return at


def debris(folder: Path) -> list[str]:
    """Temporaries of the kit's atomic writes (".name.tmp-..."), anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*.tmp-*"))
