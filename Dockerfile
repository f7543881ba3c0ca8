# fitflow's image: the project (flows/, tasks/, data/, examples/, prefect.yaml) with its dependencies, run by
# the team stack's Prefect worker and its `deployments` job (docker-compose.yml).
# The Python release the test suite ran on; every package at its pin in constraints.txt, as `make setup` installs them.
FROM python:3.11.7-slim

# Empty: PyPI's torch wheel, built with CUDA on Linux x86_64 (the GPU worker). A CPU-only image
# takes the CPU wheel index instead (TORCH_INDEX_URL in .env, passed by docker-compose.yml).
ARG TORCH_INDEX_URL=
# MLFLOW_ALLOW_PICKLE_DESERIALIZATION: flow runs started by the worker never read a pickle (README, "No pickle")
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FITFLOW_REPO=/app FITFLOW_HOME=/var/lib/fitflow PREFECT_HOME=/var/lib/fitflow/prefect \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
WORKDIR /app

# torch and torchvision first (the pair pinned in constraints.txt; the index picks the build, +cpu
# or CUDA), then the dependencies from pyproject.toml (with the gpu extra: NVML bindings, for GPU
# utilisation and memory among the system metrics) with empty packages: both layers stay cached
# until constraints.txt or pyproject.toml change.
COPY constraints.txt pyproject.toml README.md ./
RUN pip install -c constraints.txt torch torchvision ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
RUN mkdir flows tasks && touch flows/__init__.py tasks/__init__.py && pip install -c constraints.txt -e ".[gpu]"

COPY flows flows
COPY tasks tasks
COPY data data
COPY examples examples
COPY prefect.yaml ./
RUN useradd --create-home --uid 1000 fitflow \
    && mkdir -p /var/lib/fitflow/prefect && chown -R fitflow /var/lib/fitflow
USER fitflow
CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "process", "--limit", "1"]
