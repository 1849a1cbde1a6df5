# The commands a newcomer runs: `make setup`, then `make test` or `make reports`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

CONSTRAINTS ?= -c constraints.txt
# Test files whose numbers are sums the kit chunks itself; `make test` runs them again with odd chunks.
ODD_CHUNK_TESTS := tests/test_sums.py tests/test_similarity.py tests/test_distances.py tests/test_oracle.py \
	tests/test_greedy.py tests/test_two_gpus.py tests/test_evaluate.py tests/test_set_criteria.py tests/test_dispatch.py \
	tests/test_heal.py

.PHONY: setup test test-latest lab bench gpu-check wheelhouse reports docs clean

setup:  ## create .venv, install the kit with its dev extra, register the kernel, fetch assets, chromium if root
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kit)"
	$(PY) -m kit.loaders.assets fetch
	@# Debian's Chromium for the JupyterLab browser test (Playwright drives it; it never downloads a browser)
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
			|| echo "chromium not installed: tests/test_jupyterlab.py will be skipped"; \
	else echo "not root or no apt-get: chromium not installed, tests/test_jupyterlab.py will be skipped"; fi

test:  ## the whole test suite, notebooks included, on two workers; then the numeric files with odd chunk sizes (another CPU's sums)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25
	KIT_ODD_CHUNKS=1 $(PY) -m pytest -q -p no:cacheprovider $(ODD_CHUNK_TESTS)

test-latest:  ## the same, in .venv-latest with the newest releases of every dependency (no constraints file)
	$(MAKE) setup test VENV=.venv-latest CONSTRAINTS=--upgrade

lab:  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

reports:  ## notebooks 01-05 headless on the embedded model -> reports/ (HTML, figures, artifacts)
	$(PY) -m kit.experiments.reports --out reports

docs:  ## the documentation site (mkdocs.yml, docs/, the docstrings) -> site/; a warning fails it
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench:  ## benchmarks: ratios measured in one run, always on the CPU (bench/__main__.py hides any GPU)
	TQDM_DISABLE=1 $(PY) -m bench

gpu-check:  ## on a GPU machine (offline): parts full and 4bit (PART=full or PART=4bit runs one); see docs/gpus.md
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.gpu_check --part $(or $(PART),all)

wheelhouse:  ## with the package index: wheelhouse/full and wheelhouse/4bit (<= 60 MiB each) for an offline node's Python NODE_PYTHON, beyond its NODE_PACKAGES (pip list --format freeze)
	$(PY) -m bench.wheelhouse --python $(or $(NODE_PYTHON),3.12) $(if $(NODE_PACKAGES),--node-packages $(NODE_PACKAGES))

clean:
	rm -rf reports runs site .pytest_cache
