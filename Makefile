# make demo: every pipeline stage end to end on the demo profile (CPU, embedded MLflow store).
# make test: the test suite (what CI runs through .ci/run).
# The virtual environment is created on first use. TORCH_SPEC picks the torch build:
# the default takes the CPU wheel; on GPU machines install a CUDA build first (README).

PYTHON ?= python3
VENV ?= .venv
ROOT ?= ./shodh-work
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/shodh simulate --profile demo --root $(ROOT)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: install
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/python -m pytest $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-demo:
	rm -rf $(ROOT)
