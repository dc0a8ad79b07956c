# Every target creates and uses .venv itself: a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo dev test unit lint modules bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/deadlift demo

dev: install
	$(BIN)/deadlift dev

lint: install
	$(BIN)/ruff check deadlift tests
	$(BIN)/ruff format --check deadlift tests
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

# Unit tests only: no nats-server, a few seconds (tests/integration needs the server).
unit: install
	$(BIN)/pytest tests/unit

modules:
	cd workers && npm ci --no-audit --no-fund && npm run build

bench: install
	$(BIN)/deadlift bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
