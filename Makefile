# The README's two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
# dev: test tools; tpu: libtpu, so `maxmodel compile` can compile for TPU topologies on this CPU host;
# seqio: the seqio bridge (tensorflow, ~2.4 GB), whose tests run in CI.
EXTRAS ?= dev,tpu,seqio

.PHONY: setup train test lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 12) else \
	  f"maxmodel needs Python >= 3.12, found {v.major}.{v.minor} ({sys.executable}); run: make PYTHON=/path/to/python3.12")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/maxmodel train

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --timeout=900 tests

lint: $(STAMP)
	$(BIN)/ruff check maxmodel tests

clean:
	rm -rf $(VENV) runs .pytest_cache
