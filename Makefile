# Two entry points, each working on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision are pinned to the builds that lie on this machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all bench install-test install-bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-test: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q -e ".[bench]"
	touch $@

install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

demo: $(VENV)/.installed-test
	$(VENV)/bin/fxcompress demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" -n 2 tests

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests

# Every benchmark script (helpers start with "_"), then the page that joins their sections.
bench: $(VENV)/.installed-bench
	for b in $(filter-out benchmarks/_% benchmarks/assemble_docs.py,$(wildcard benchmarks/*.py)); do \
		$(PY) $$b || exit 1; done
	$(PY) benchmarks/assemble_docs.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
