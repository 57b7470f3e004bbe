# medfed: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

DEMO_DATA := data/demo
DEMO_RUN  := runs/demo

.PHONY: install demo test lint types unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/medfed synth --sites 4 --images-per-site 160 --seed 0 --out $(DEMO_DATA) --force
	$(BIN)/medfed check-data $(DEMO_DATA)/sites/hospital-01
	$(BIN)/medfed simulate --data $(DEMO_DATA)/sites --test-data $(DEMO_DATA)/test \
		--out $(DEMO_RUN) --rounds 5 --force
	@echo
	@echo "Demo finished. Results: $(DEMO_RUN)/results.json, plot: $(DEMO_RUN)/metrics.png," \
		"model: $(DEMO_RUN)/model.pt"

lint: install
	$(BIN)/ruff check .

types: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -q

test: lint types unit

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RUN) .pytest_cache .mypy_cache .ruff_cache
