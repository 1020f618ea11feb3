# Two commands for a fresh machine: `make demo` (the whole pipeline on CPU) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install clean

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

clean:
	rm -rf demo_output .pytest_cache
