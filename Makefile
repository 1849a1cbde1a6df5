# The commands a newcomer runs: `make setup`, then `make test` or `make reports`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup test lab bench gpu-check wheelhouse reports clean

setup:  ## create .venv, install the kit with its dev extra, register the kernel, fetch assets, chromium if root
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kit)"
	$(PY) -m kit.loaders.assets fetch
	@# Debian's Chromium for the JupyterLab browser test (Playwright drives it; it never downloads a browser)
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
			|| echo "chromium not installed: tests/test_jupyterlab.py will be skipped"; \
	else echo "not root or no apt-get: chromium not installed, tests/test_jupyterlab.py will be skipped"; fi

test:  ## the whole test suite, notebooks included
	$(PY) -m pytest -q --durations=25

lab:  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

reports:  ## notebooks 01-05 headless on the embedded model -> reports/ (HTML, figures, artifacts)
	$(PY) -m kit.experiments.reports --out reports

bench:  ## benchmarks: ratios measured in one run
	TQDM_DISABLE=1 $(PY) -m bench

gpu-check:  ## on a GPU machine (offline): parts full and 4bit (PART=full or PART=4bit runs one); see README "On a GPU"
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.gpu_check --part $(or $(PART),all)

wheelhouse:  ## with the package index: wheelhouse/full and wheelhouse/4bit (<= 60 MiB each) for an offline node's Python NODE_PYTHON, beyond its NODE_PACKAGES (pip list --format freeze)
	$(PY) -m bench.wheelhouse --python $(or $(NODE_PYTHON),3.12) $(if $(NODE_PACKAGES),--node-packages $(NODE_PACKAGES))

clean:
	rm -rf reports runs .pytest_cache
