# medfed: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

DEMO_DATA := data/demo
DEMO_RUN  := runs/demo

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
demo: install
	$(BIN)/medfed synth --sites 4 --images-per-site 500 --test-images 400 --seed 0 \
		--out $(DEMO_DATA) --force
	$(BIN)/medfed check-data $(DEMO_DATA)/sites/hospital-01
	$(BIN)/medfed simulate --data $(DEMO_DATA)/sites --test-data $(DEMO_DATA)/test \
		--out $(DEMO_RUN) --rounds 20 --batch-size 64 --lr 0.001 --force
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

# System tools the metrics tests drive: a real Prometheus and a headless Chromium (Debian).
.PHONY: test-deps
test-deps:
	@missing=""; \
	[ -x /usr/bin/prometheus ] || missing="$$missing prometheus"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (Debian packages) for the tests"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else \
		echo "the metrics tests need$$missing: run 'sudo apt-get install -y$$missing'" \
			"(or 'sudo make test-deps'); without them they skip locally and fail in CI"; \
	fi

unit: install test-deps
	$(BIN)/python -m pytest -q

test: lint types unit

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RUN) .pytest_cache .mypy_cache .ruff_cache
