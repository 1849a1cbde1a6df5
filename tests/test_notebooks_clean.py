"""Committed notebooks carry no outputs and follow the team's anatomy."""

import json
import re

import pytest
import tomllib
from conftest import NOTEBOOKS, REPO


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{name}: strip outputs"
    parameters = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1, f"{name}: exactly one cell tagged 'parameters'"
    source = "".join(parameters[0]["source"])
    assert 'RUN = "demo"' in source and "RUNS_ROOT" in source
    assert "colab.research.google.com" in "".join(nb["cells"][0]["source"]), f"{name}: Colab badge in the first cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name):
    import papermill

    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = [line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if line.strip()]
    assert list(papermill.inspect_notebook(REPO / "notebooks" / f"{name}.ipynb")) == assigned


REPOSITORY = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_cells_use_the_repository_of_pyproject(name):
    text = (REPO / "notebooks" / f"{name}.ipynb").read_text()
    installs = re.findall(r'%pip install -q \\"deeper-layers-kit @ git\+([^\\"]+)\\"', text)
    assert installs == [REPOSITORY], f"{name}: the Colab cell installs the kit from [project.urls] Repository"
    badge = REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    assert f"{badge}/blob/main/notebooks/{name}.ipynb" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_takes_the_device_policy_as_parameters(name):
    import papermill

    parameters = papermill.inspect_notebook(REPO / "notebooks" / f"{name}.ipynb")
    assert {"DEVICE", "DTYPE", "QUANTIZE"} <= set(parameters), f"{name}: DEVICE, DTYPE and QUANTIZE parameters"
    assert parameters["DEVICE"]["default"] == parameters["DTYPE"]["default"] == '"auto"'
    assert parameters["RUNS_ROOT"]["default"] == '"auto"'


def _cells(name: str, kind: str) -> list[str]:
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_every_notebook_opens_with_the_same_minimal_preamble():
    preambles = {_cells(name, "code")[1] for name in NOTEBOOKS}  # the cell after the parameters
    (preamble,) = preambles
    assert preamble.index("%pip install") < preamble.index("import kit")  # Colab installs the kit before importing it
    assert preamble.endswith("run = kit.Run(RUN, RUNS_ROOT, device=DEVICE, dtype=DTYPE, seed=SEED)")


STEP_OF = {"01_similarity": ["scan"], "02_select_and_prune": ["prune"], "03_heal": ["heal"], "04_compare": ["sweep", "evaluate"],
           "05_criteria": ["criteria"], "06_granularity": ["budget"], "07_heal_compare": ["heal_compare"]}  # fmt: skip


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_one_import_style_the_steps_and_a_generated_reading(name):
    code = _cells(name, "code")
    imports = [line for cell in code for line in cell.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports == ["import sys", "import kit"], f"{name}: `import kit` alone, names used as kit.name"
    called = re.findall(r"kit\.steps\.(\w+)\(run, config", "\n".join(code))
    assert called == STEP_OF[name], f"{name}: the notebook is a face of kit.steps: it runs {STEP_OF[name]}"
    assert code[-1] == f'kit.readings.reading(run, "{name}")', f"{name}: the reading closes the notebook"
    assert _cells(name, "markdown")[-1].startswith("## Reading the result\n")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_use_public_names_only(name):
    """kit.<name> of kit.__all__, and at most one name inside it (kit.steps.scan, kit.plots.save): never a path into
    the kit's internals (kit.core.artifacts.write_text), which the library may move."""
    import kit

    for cell in _cells(name, "code"):
        for chain in re.findall(r"(?<![\w.])kit((?:\.\w+)+)", cell):
            parts = chain.split(".")[1:]
            assert parts[0] in kit.__all__, f"{name}: kit.{parts[0]} is not a public name (kit.__all__)"
            assert len(parts) <= 2, f"{name}: kit{chain} reaches into the kit's internals; use a public name"


# Numbers a markdown cell may state: they are not results of a run. Contexts first (headings, notebook and
# figure numbers, model names, the paper's year, "4-bit", "5-shot"), then cited constants with their source.
CONTEXTS = [r"^#+ \d+\.", r"^# \d\d ·", r"[Nn]otebooks?\s+\d\d(-\d\d)?(\s+and\s+\d\d)?", r"Figures? \d+(\(b\))?( and \d+)?",
            r"\(\d{4}\)", r"\b[A-Z][\w]*-\d+(-\d+B)?\b", r"\b\d+B\b", r"\d+-bit", r"\d+-shot", r"\d+e-\d+", r"`[^`]*`", r"\]\([^)]*\)"]  # fmt: skip
CITED = {
    "0", "1", "1.96", "95", "100",  # zero differences and regrets, a Spearman of 1, the 95% intervals (z = 1.96), shares
    "0.25",  # MMLU's chance level (four choices)
    "0.05", "16", "5000", "5,000", "2", "45", "55", "35", "25", "20",  # the paper: dropout, batch, steps, rank; collapse points (Figure 2)
    "32", "1000", "5",  # the scan's resampling groups and resamples, the 5% share listed (kit.scan.distances)
    "14,000", "57",  # questions and subjects of all of MMLU
}
NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?!\w)")


def _parameter_values(name: str) -> set[str]:
    import papermill

    defaults = papermill.inspect_notebook(REPO / "notebooks" / f"{name}.ipynb")
    return {number for p in defaults.values() for number in NUMBER.findall(str(p["default"]))}


def hard_coded_numbers(name: str) -> list[str]:
    """The numbers of `name`'s markdown that are not parameters, paper figures or cited constants."""
    found = []
    for text in _cells(name, "markdown"):
        for pattern in CONTEXTS:
            text = re.sub(pattern, " ", text, flags=re.MULTILINE)
        found += [n for n in NUMBER.findall(text) if n not in CITED | _parameter_values(name)]
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_result_typed_into_the_markdown(name):
    assert hard_coded_numbers(name) == [], f"{name}: results belong in the generated reading (kit.experiments.readings)"
