# The two set-up commands are `make serve` and `make test`; everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: serve test lint typecheck proto demo-store bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

## serve the bundled demo store on 127.0.0.1:8001 (Ctrl-C to stop)
serve: $(STAMP)
	$(VENV)/bin/modelgate serve

## install test dependencies (Python packages, redis-server, h2load, tritonserver, podman) and run every test
test: $(STAMP)
	bash scripts/install_test_deps.sh
	$(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## regenerate modelgate_pb/ from protos/
proto: $(STAMP)
	$(PY) scripts/gen_protos.py

## rebuild gateway/demo_store from scikit-learn's bundled data
demo-store: $(STAMP)
	$(PY) scripts/build_demo_store.py

bench: $(STAMP)
	$(PY) -m loadtests.benchmark

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
