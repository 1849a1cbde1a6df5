"""`make reports`: notebooks 01-05 run headless through papermill on the embedded model with
their default parameters (sized for a 2-core CPU), written as executed notebooks, HTML and
figures under reports/."""

import argparse
import shutil
import time
from pathlib import Path

NOTEBOOKS = ("01_similarity", "02_select_and_prune", "03_heal", "04_compare", "05_criteria")
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, *, output_dir: Path, parameters: dict, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """Execute notebook `name` with `parameters`; the executed copy is written to output_dir."""
    import papermill

    source = notebooks_dir / f"{name}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: reports run from a clone of the kit's repository")
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kit.reports", description=__doc__)
    parser.add_argument("--out", default="reports", help="folder for notebooks, HTML and the run's artifacts")
    parser.add_argument("--run", default="report", help="run name (folder under OUT/runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out / "runs" / args.run, ignore_errors=True)  # a report starts from a clean run
    for name in NOTEBOOKS:
        started = time.perf_counter()
        parameters = {"RUN": args.run, "RUNS_ROOT": str((out / "runs").resolve())}
        html = to_html(execute(name, output_dir=out, parameters=parameters))
        print(f"{name}: {html} ({time.perf_counter() - started:.0f} s)")
    print(f"figures and artifacts: {out / 'runs' / args.run}")


if __name__ == "__main__":
    main()
