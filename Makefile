# One-command set-up: `make demo` and `make test` each create .venv/ first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/datasets/hymenoptera

.PHONY: setup demo test test-fast lint docs clean

setup: $(STAMP)

# torch/torchvision come pinned through the constraints file: pip takes both from this machine's disk.
$(STAMP): pyproject.toml constraints/torch.txt constraints/litert.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/torch.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints/torch.txt -c constraints/litert.txt -e '.[dev,export,tflite]'
	touch $(STAMP)

demo: setup
	$(BIN)/transferlab train $(DATA) --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

# the unit layer alone: no training runs, no subprocesses (a minute or so)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# the guide's runs, then docs/guide.md, docs/guide_runs.json and docs/figures/ from them; DOCS_SIZE=tiny: a quick check
DOCS_SIZE ?= full
docs: setup
	$(BIN)/python docs/make_guide.py --size $(DOCS_SIZE)

clean:
	rm -rf $(VENV) runs .cache
