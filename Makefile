# medfed: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

DEMO_DATA := data/demo
DEMO_RUN  := runs/demo
# The demo's dashboard and /metrics; `make demo METRICS_PORT=9500` moves them, 0 turns them off.
METRICS_PORT ?= 9400

.PHONY: install demo test lint types unit clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# DP-SGD at epsilon 8 needs sites of a few hundred images, batches of 64 and a livelier learning
# rate to learn in 20 rounds; smaller sites drown in the noise their privacy needs.
# The port is checked first (standard library only, nothing installed yet): a taken port used to
# end the demo after minutes of install and synth.
demo:
	@$(PYTHON) -E -S -m common.ports --how "run 'make demo METRICS_PORT={free}'" \
		METRICS_PORT=127.0.0.1:$(METRICS_PORT)
	@$(MAKE) --no-print-directory install
	$(BIN)/medfed synth --sites 4 --images-per-site 500 --test-images 400 --seed 0 \
		--out $(DEMO_DATA) --force
	$(BIN)/medfed check-data $(DEMO_DATA)/sites/hospital-01
	$(BIN)/medfed simulate --data $(DEMO_DATA)/sites --test-data $(DEMO_DATA)/test \
		--out $(DEMO_RUN) --rounds 20 --batch-size 64 --lr 0.001 --metrics-port $(METRICS_PORT) \
		--force
	@echo
	@echo "Demo finished. Results: $(DEMO_RUN)/results.json, plot: $(DEMO_RUN)/metrics.png," \
		"model: $(DEMO_RUN)/model.pt"

# Benchmark figures (bench/run.py) into bench/results.json and BENCHMARKS.md: about 10 minutes
# on 2 CPU cores; BENCH=full runs the long version (bigger workloads, 1,000 sites).
bench: install
	BENCH=$(or $(BENCH),quick) $(BIN)/python -m bench.run

lint: install
	$(BIN)/ruff check .

types: install
	$(BIN)/mypy

# System tools the tests drive (Debian packages: Prometheus, Chromium, nginx). As root it installs
# what is missing without recommends and starts no service; it says what it installed.
.PHONY: test-deps
test-deps:
	@sh tests/install_tools.sh

# Two pytest workers where there are two cores (CI has 2), one where there is one. --dist loadfile
# keeps each test file on one worker, in order: module fixtures (a whole TLS federation, a live
# run) are built once, and the tests of a file that build on each other's runs stay in sequence.
unit: install test-deps
	$(BIN)/python -m pytest -q -n auto --maxprocesses 2 --dist loadfile

test: lint types unit

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RUN) .pytest_cache .mypy_cache .ruff_cache
