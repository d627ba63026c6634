# Tickwire: the two quick-start commands are `make demo` and `make test`.
# Both run the idempotent set-up first (Debian packages, kernel headers for bcc, venv).
VENV ?= .venv
PY := $(VENV)/bin/python
TICKWIRE := $(VENV)/bin/tickwire

.PHONY: setup test demo bench lint image clean

setup:
	@bash host/setup.sh

test: setup
	$(PY) -m pytest

demo: setup
	@$(PY) -m host.exchange.demo

bench: setup
	$(TICKWIRE) bench book

image: setup
	$(TICKWIRE) image build

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
