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
    installs = re.findall(r'%pip install -q \\"kit @ git\+([^\\"]+)\\"', text)
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
