# The two commands of the README:
#   make run    create .venv, install dualhess with both frameworks, run the main job
#   make test   create .venv, install .[all,dev], run ruff and the test suite
# And for CI:
#   make test-install   build the wheel, install it per extra into fresh venvs, run the CLI
#   make docs           build the documentation site (mkdocs, warnings are errors) into site/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -c constraints.txt

.PHONY: run test test-install docs lint install install-dev clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) -q -e '.[all]'
	$(PY) .ci/drop_broken_torchvision.py
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -q -e '.[all,dev]'
	$(PY) .ci/drop_broken_torchvision.py
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(VENV)/bin/dualhess analyze

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

# Two pytest workers, one thread each: torch's default of one thread per core would put
# four busy threads on two cores.
test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q

# The wheel alone, per extra (core only, [torch], [jax], [all]; fewer with EXTRAS="core torch"),
# in fresh venvs: dualhess analyze writes a report with what each extra installs.
EXTRAS ?= core torch jax all
test-install: $(PY)
	$(PY) .ci/test_install.py $(EXTRAS)

# The documentation site (mkdocs-material, API reference from the numpydoc docstrings) into
# site/, warnings as errors. The reference imports dualhess, torch_backend and jax_backend.
docs: $(VENV)/.installed
	$(PIP) -q -e '.[all,docs]'
	$(PY) .ci/drop_broken_torchvision.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed-dev
	$(PIP) -q -e '.[bench]'
	$(PY) .ci/drop_broken_torchvision.py
	$(PY) -m benchmarks.run --suite cpu

clean:
	rm -rf $(VENV) dualhess-report site
