"""The report step: the reading of every step a run has, computed from its artifacts, in one markdown file."""

from ..experiments.readings import reading
from ..run import Run

# each notebook's reading, and the artifacts it reads (all present: the step ran)
READINGS = {"01_similarity": ("distances", "choices"), "02_select_and_prune": ("selection", "losses"),
            "03_heal": ("heal_history", "heal_losses"), "04_compare": ("sweep", "comparison", "collapse", "paired"),
            "05_criteria": ("criteria",), "06_granularity": ("budget", "budget_best"),
            "07_heal_compare": ("heal_compare", "heal_paired", "heal_best", "heal_refused")}  # fmt: skip


def report(run: Run) -> str:
    """The readings of the run's finished steps, as markdown: written to report.md and returned."""
    found = [notebook for notebook, needs in READINGS.items() if all(run.has(name) for name in needs)]
    if not found:
        raise FileNotFoundError(f"{run.path} holds no finished step to report on: run `python -m kit scan --run {run.path}` first")
    sections = [f"## {notebook}\n\n{reading(run.path, notebook).markdown}" for notebook in found]
    text = f"# Run {run.path.name}\n\n" + "\n\n".join(sections) + "\n"
    run.write_text("report", text)
    return text
