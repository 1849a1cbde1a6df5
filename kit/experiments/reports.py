"""`make reports`: notebooks 01-06 run headless through papermill on the embedded model with
their default parameters (sized for a 2-core CPU), written as executed notebooks, HTML and
figures under reports/."""

import argparse
import os
import resource
import shutil
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

NOTEBOOKS = ("01_similarity", "02_select_and_prune", "03_heal", "04_compare", "05_criteria", "06_granularity", "07_heal_compare")
INSTALLED = Path(sysconfig.get_path("data")) / "share" / "deeper-layers-kit" / "notebooks"  # pip installs them there


def find_notebooks() -> Path:
    """Where the notebooks are: $KIT_NOTEBOOKS if set; the clone's notebooks/ when the kit runs from a clone (an
    editable install, `make reports`); else the copies `pip install` put in the environment's share/ folder."""
    if "KIT_NOTEBOOKS" in os.environ:
        return Path(os.environ["KIT_NOTEBOOKS"])
    clone = Path(__file__).resolve().parents[2]
    if (clone / "pyproject.toml").is_file() and (clone / "notebooks" / f"{NOTEBOOKS[0]}.ipynb").is_file():
        return clone / "notebooks"
    return INSTALLED


def execute(name: str, *, output_dir: Path, parameters: dict, notebooks_dir: Path | None = None) -> Path:
    """Execute notebook `name` with `parameters`; the executed copy is written to output_dir."""
    import papermill

    notebooks_dir = notebooks_dir or find_notebooks()
    source = notebooks_dir / f"{name}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: set KIT_NOTEBOOKS to a folder holding the kit's notebooks")
    output = Path(output_dir) / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        source, output, parameters=parameters, kernel_name="python3", cwd=str(notebooks_dir), progress_bar=False
    )
    return output


def to_html(notebook: Path) -> Path:
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_filename(str(notebook))
    target = notebook.with_suffix(".html")
    target.write_text(html)
    return target


@contextmanager
def timed(times: list):
    """Append (wall seconds, CPU seconds) of the block to `times`: CPU is user + system time of this
    process and of its finished children (papermill's kernel), less swayed than wall time by other jobs."""

    def cpu() -> float:
        return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))

    wall, used = time.perf_counter(), cpu()
    yield
    times.append((time.perf_counter() - wall, cpu() - used))


def minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kit.experiments.reports", description=__doc__)
    parser.add_argument("--out", default="reports", help="folder for notebooks, HTML and the run's artifacts")
    parser.add_argument("--run", default="report", help="run name (folder under OUT/runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out / "runs" / args.run, ignore_errors=True)  # a report starts from a clean run
    times: list[tuple[float, float]] = []
    for name in NOTEBOOKS:
        parameters = {"RUN": args.run, "RUNS_ROOT": str((out / "runs").resolve())}
        with timed(times):
            html = to_html(execute(name, output_dir=out, parameters=parameters))
        print(f"{name}: {html} ({times[-1][0]:.0f} s, CPU {times[-1][1]:.0f} s)", flush=True)
    wall, used = map(sum, zip(*times))
    print(f"figures and artifacts: {out / 'runs' / args.run}")
    print("per notebook: " + ", ".join(f"{name[:2]} {w:.0f} s" for name, (w, _) in zip(NOTEBOOKS, times)))
    print(f"total: {minutes(wall)} (CPU {minutes(used)} on {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
