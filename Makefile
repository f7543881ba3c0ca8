# fitflow: `make run` trains the default dataset, `make test` runs the test suite.
# Both create the virtual environment first when it is missing or pyproject.toml or
# constraints.txt changed; every package is installed at its pin in constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision first, as the pair pinned in constraints.txt (the pins leave the build,
# +cpu or +cu130, to the index). PyPI's torch 2.14.1 is a CUDA build that also runs on CPUs.
# Another index: make setup TORCH_PIP_ARGS="--index-url <your wheel index>"
TORCH_PIP_ARGS ?=
# -n 2 --dist loadfile: two worker processes, a test file stays on one (its module fixtures, its servers)
PYTEST_WORKERS ?= -n 2 --dist loadfile
PYTEST_ARGS ?=

.PHONY: setup lock run test mlflow-ui clean-state prefect-server deploy serve up down

$(BIN)/fitflow: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch torchvision $(TORCH_PIP_ARGS) -c constraints.txt
	$(BIN)/python -m pip install --quiet -e ".[test]" -c constraints.txt
	touch $@

setup: $(BIN)/fitflow

# After a change to pyproject.toml or a deliberate `pip install -U` in the venv: install what
# pyproject.toml asks for now (installed versions that still satisfy it stay), then pin the venv.
# The comment lines at the top of constraints.txt stay; torch and torchvision are pinned without their build tags.
# The venv is only created when missing (order-only): a rebuild would apply the old pins.
lock: | $(BIN)/fitflow
	$(BIN)/python -m pip install --quiet -e ".[test]"
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch(vision)?==[^+]+)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(BIN)/fitflow

run: setup
	$(BIN)/fitflow train

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS) || [ $$? -eq 5 ]

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

# The whole local stack in one command (flows/local_stack.py): Prefect server + UI on 4200, MLflow
# server + UI on 5000, the deployments served; Ctrl-C (or `make down` elsewhere) stops it all.
up: setup
	$(BIN)/fitflow up --limit $(or $(GPUS),1)

down: setup
	$(BIN)/fitflow down
