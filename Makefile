# Two commands do all set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test lint bench bench-quality browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, so that no range elsewhere pulls a multi-GB GPU build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[dev,demo]"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/python demo/offline_demo.py

# Debian's Chromium for the Space's browser test, where it can be installed (root or
# password-less sudo, and apt-get); elsewhere that one test is skipped with a message.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "make: no apt-get; the browser test will be skipped"; \
	else SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "make: installing Debian's chromium and chromium-driver for the browser test"; \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver; } >/dev/null 2>&1 \
	  || echo "make: could not install Chromium; the browser test will be skipped"; fi

test: $(VENV)/.dev browser
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/python -m ruff check hfmerge tests benchmarks demo spaces

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/stream.py

# The merge-quality benchmark: writes benchmarks/RESULTS.md and its plots (under an hour on a 2-core CPU;
# `$(BIN)/python -m benchmarks.suite --quick` runs a smaller setting in under ten minutes).
bench-quality: $(VENV)/.dev
	$(BIN)/python -m benchmarks.suite

clean:
	rm -rf $(VENV) demo-output benchmarks/out .pytest_cache
