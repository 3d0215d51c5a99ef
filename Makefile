# make demo: every pipeline stage end to end on the demo profile (CPU, embedded MLflow store).
# make test: the test suite (what CI runs through .ci/run).
# make test-fast: the in-process unit tests (`-m fast`, marked in tests/conftest.py), well under a minute.
# make lint: ruff (configured in pyproject.toml).
# The virtual environment is created on first use and its bin/ leads PATH (DeepSpeed JIT builds
# find the same ninja in every process). TORCH_SPEC picks the torch build:
# the default takes the CPU wheel; on GPU machines install a CUDA build first (README).

PYTHON ?= python3
VENV ?= .venv
ROOT ?= ./shodh-work
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
PYTEST_ARGS ?=
# DeepSpeed JIT-builds its CPU communication op on first use (~2 min on 2 cores); one shared
# cache means it is built once, not by every test process that happens to start first.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/shodh/torch_extensions

.PHONY: demo test test-fast lint install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Each stage is resumable: rerunning `make demo` skips finished work. Stage wall times are printed.
demo: install
	@set -e; export DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu}; start=$$(date +%s); \
	stage() { t0=$$(date +%s); echo "==> shodh $$*"; $(BIN)/shodh "$$@" --profile demo --root $(ROOT); \
	          echo "==> shodh $$1: $$(( $$(date +%s) - t0 )) s"; }; \
	stage simulate; \
	stage train-tokenizer; \
	stage audit; \
	stage encode; \
	stage pretrain --run-name demo-moe; \
	stage pretrain --run-name demo-dense model.kind=dense_active; \
	stage evaluate --run demo-moe; \
	stage evaluate --run demo-dense; \
	stage study --seeds 1; \
	echo "==> demo done in $$(( $$(date +%s) - start )) s; browse the runs: $(BIN)/shodh ui --root $(ROOT)"

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: install
	@echo "==> DeepSpeed CPU comm op (built once into $(TORCH_EXTENSIONS_DIR))"
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/python -m pytest $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	@start=$$(date +%s); \
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/python -m pytest -m fast $(PYTEST_ARGS); \
	rc=$$?; echo "==> test-fast: $$(( $$(date +%s) - start )) s"; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check shodh tests benchmarks data_pipeline

clean-demo:
	rm -rf $(ROOT)
