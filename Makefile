# The commands a newcomer runs: `make setup`, then `make test` or `make reports`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup test lab bench reports clean

setup:  ## create .venv, install the kit with its dev extra, register the kernel, fetch assets
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kit)"
	$(PY) -m kit.assets fetch

test:  ## the whole test suite, notebooks included
	$(PY) -m pytest -q

lab:  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

reports:  ## notebooks 01-05 headless on the embedded model -> reports/ (HTML, figures, artifacts)
	$(PY) -m kit.reports --out reports

bench:  ## benchmarks: ratios measured in one run
	TQDM_DISABLE=1 $(PY) -m bench

clean:
	rm -rf reports runs .pytest_cache
