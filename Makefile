# The README's two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
# What each target installs into .venv: `make train` only maxmodel's own dependencies (what training the default
# model needs); the extras of pyproject.toml come with the targets that use them. A stamp per part records
# what is already in.
#   dev: test tools and ruff; tpu: libtpu, so `maxmodel compile` can compile for TPU topologies on this CPU host;
#   seqio: the seqio bridge (tensorflow, ~2.4 GB), whose tests run in CI; interop: safetensors, for `maxmodel convert`;
#   serve: FastAPI, uvicorn and prometheus-client, for `maxmodel serve`; eval: lm-eval, sacrebleu, rouge-score,
#   for `maxmodel eval`.
TEST_EXTRAS := dev,tpu,seqio,interop,serve,eval
BASE_STAMP := $(VENV)/.installed-base
extra_stamp = $(VENV)/.installed-$(1)

# The Hugging Face side of tests/test_interop_*.py (torch + transformers) lives in its own venv and runs out of
# process (tests/hf_oracle.py), so maxmodel's venv never imports torch. Its packages are the `hf` extra's; a
# CPU torch wheel of the pinned version in $(WHEELS) (here: cp311) is used with its Python, because PyPI's Linux
# torch is the multi-GB CUDA build. Without one, $(PYTHON) gets the extra's torch from PyPI.
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.installed
WHEELS ?= /opt/wheels

.PHONY: setup setup-dev setup-tpu setup-seqio setup-interop setup-serve setup-eval setup-test setup-hf train test lint clean

$(BASE_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 12) else \
	  f"maxmodel needs Python >= 3.12, found {v.major}.{v.minor} ({sys.executable}); run: make PYTHON=/path/to/python3.12")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

# One extra: `make setup-tpu` installs .[tpu] into the same venv (and the base first); `test` is all that
# the test suite needs, in one resolve.
$(VENV)/.installed-test: pyproject.toml $(BASE_STAMP)
	$(BIN)/pip install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

$(VENV)/.installed-%: pyproject.toml $(BASE_STAMP)
	$(BIN)/pip install -q -e '.[$*]'
	touch $@

setup: $(BASE_STAMP)
setup-dev: $(call extra_stamp,dev)
setup-tpu: $(call extra_stamp,tpu)
setup-seqio: $(call extra_stamp,seqio)
setup-interop: $(call extra_stamp,interop)
setup-serve: $(call extra_stamp,serve)
setup-eval: $(call extra_stamp,eval)
setup-test: $(call extra_stamp,test)

$(HF_STAMP): pyproject.toml
	@set -e; \
	reqs="$$($(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["hf"])')"; \
	torch="$$(printf '%s\n' $$reqs | sed -n 's/^torch==//p')"; \
	wheel="$$(ls $(WHEELS)/torch-$$torch+cpu-cp3*-*x86_64.whl 2>/dev/null | head -n 1)"; \
	py="python$$(basename "$$wheel" 2>/dev/null | sed -n 's/.*-cp3\([0-9]*\)-.*/3.\1/p')"; \
	if [ -n "$$wheel" ] && command -v "$$py" >/dev/null; then links="--find-links $(WHEELS)"; \
	else py="$(PYTHON)"; links=""; fi; \
	echo "$(HF_VENV): $$py with $$reqs $${links:+(torch from $$wheel)}"; \
	test -x $(HF_VENV)/bin/python || "$$py" -m venv $(HF_VENV); \
	$(HF_VENV)/bin/pip install -q --upgrade pip; \
	$(HF_VENV)/bin/pip install -q $$links $$reqs numpy
	touch $(HF_STAMP)

setup-hf: $(HF_STAMP)

train: $(BASE_STAMP)
	$(BIN)/maxmodel train

test: setup-test $(HF_STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --timeout=600 tests

lint: setup-dev
	$(BIN)/ruff check maxmodel tests

clean:
	rm -rf $(VENV) $(HF_VENV) runs .pytest_cache
