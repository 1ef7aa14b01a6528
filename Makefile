# The two commands of the README:
#   make run    create .venv, install dualhess with both frameworks, run the main job
#   make test   create .venv, install .[all,dev], run ruff and the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -c constraints.txt

.PHONY: run test lint install install-dev clean bench

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

bench: $(VENV)/.installed-dev
	$(PIP) -q -e '.[bench]'
	$(PY) .ci/drop_broken_torchvision.py
	$(PY) -m benchmarks.run --suite cpu

clean:
	rm -rf $(VENV) dualhess-report
