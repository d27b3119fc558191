# Two entry points: `make run` and `make test`. Both bootstrap .venv on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ccwarm-bootstrapped

PROXY_PORT ?= 8082
SERVER_PORT ?= 8080
UPSTREAM ?=
MODEL ?=
PYTEST_ARGS ?=
ARGS ?=

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@bash scripts/bootstrap.sh

run: $(STAMP)
	@$(PY) scripts/run_stack.py --proxy-port $(PROXY_PORT) --server-port $(SERVER_PORT) \
		$(if $(UPSTREAM),--upstream $(UPSTREAM)) $(if $(MODEL),--model $(MODEL)) $(ARGS)

# ruff first: a lint or format slip fails the suite before any test runs.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis artifacts
