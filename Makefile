# Two commands for a fresh machine: `make demo` (the whole pipeline on CPU) and `make test`;
# `make serve` then serves the demo's model as a web page and JSON API.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test serve install clean

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

test: install
	$(BIN)/python -m pytest -q

serve: install
	test -f $(DEMO_CHECKPOINT) || $(BIN)/lungdet demo
	$(BIN)/lungdet serve --checkpoint $(DEMO_CHECKPOINT) $(SERVE_ARGS)

clean:
	rm -rf demo_output .pytest_cache
