# The two commands: `make test` and `make demo`. Each sets up .venv from scratch on a
# machine that only has python3, so a clean clone (and CI) needs nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo bench clean venv sysdeps

venv: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

test: $(STAMP) sysdeps lint typecheck pytest

# Chromium + chromedriver, redis-server and CJK fonts (apt, when missing) and axe-core (npm):
# the real servers and browser the end-to-end tests drive.
sysdeps: $(STAMP)
	bash tools/sysdeps.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# The demo: a misbehaving upstream plus the FastAPI example on http://127.0.0.1:8000/.
# Any port can move: make demo PORT=18000 UPSTREAM_PORT=19101 CONTROL_PORT=19102 (0: any free).
PORT          ?= 8000
UPSTREAM_PORT ?= 9101
CONTROL_PORT  ?= 9102
demo: $(STAMP)
	$(BIN)/python examples/demo.py --port $(PORT) --upstream-port $(UPSTREAM_PORT) --control-port $(CONTROL_PORT)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
