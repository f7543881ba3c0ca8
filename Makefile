# fitflow: `make run` trains the default dataset, `make test` runs the test suite.
# Both create the virtual environment first when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel first: a bare `torch` requirement may pull a multi-GB CUDA build.
# On a GPU machine: make setup TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test mlflow-ui clean-state prefect-server deploy serve

$(BIN)/fitflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/fitflow

run: setup
	$(BIN)/fitflow train

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(or $(FITFLOW_HOME),$(CURDIR)/.fitflow)/mlflow.db" --host 127.0.0.1 --port 5000

clean-state:
	rm -rf .fitflow

# Team / server path (see README "Scheduled and UI-triggered runs"): a Prefect server on
# 127.0.0.1:4200, then the deployments of prefect.yaml, served (`serve`) or for workers (`deploy`).
prefect-server: setup
	PREFECT_HOME="$(or $(FITFLOW_HOME),$(CURDIR)/.fitflow)/prefect" $(BIN)/prefect server start --host 127.0.0.1 --port 4200

deploy: setup
	$(BIN)/fitflow setup --gpus $(or $(GPUS),1)
	FITFLOW_REPO="$(CURDIR)" $(BIN)/prefect --no-prompt deploy --all

serve: setup
	$(BIN)/fitflow serve --limit $(or $(GPUS),1)
