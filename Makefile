# Two commands for a fresh machine: `make demo` (the whole pipeline on CPU) and `make test`;
# `make serve` then serves the demo's model as a web page and JSON API.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo demo-real benchmark-real test lint format serve install clean

# The checkpoint `make serve` serves; `make demo` writes it. SERVE_ARGS adds lungdet serve options (--port 8080).
DEMO_CHECKPOINT := demo_output/run/best.pt
SERVE_ARGS ?=

$(BIN)/lungdet: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision pinned to the builds this machine serves from local files; newer would download GBs.
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/lungdet

install: $(BIN)/lungdet

demo: install
	$(BIN)/lungdet demo

# One model trained on 800 real RSNA radiographs (../shared/data/rsna_real), scored on the 200 held out.
demo-real: install
	$(BIN)/lungdet demo --real

# Five folds and a final model on the 800, tuned out of fold, every step of the winners' path on the 200 held out (80 min on 2 cores).
REAL_WORK ?= runs/real
benchmark-real: install
	$(BIN)/python benchmarks/real_data.py --work $(REAL_WORK) --final

test: install
	$(BIN)/python -m pytest -q

# What .ci/run checks before the tests: the code as ruff formats it, and no lint finding (rules in pyproject.toml).
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Fixes what `make lint` finds where ruff can (formatting, import order); the rest it names.
format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

serve: install
	test -f $(DEMO_CHECKPOINT) || $(BIN)/lungdet demo
	$(BIN)/lungdet serve --checkpoint $(DEMO_CHECKPOINT) $(SERVE_ARGS)

clean:
	rm -rf demo_output demo_real_output .pytest_cache
