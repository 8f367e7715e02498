# syntax=docker/dockerfile:1
# Shipyard's images, from one multi-stage build:
#
#   docker build --target operator -t shipyard/operator:0.1.0 .                 # the operator (no torch)
#   docker build --target runtime  -t shipyard/runtime:0.1.0-cpu .              # compression + serving, CPU torch
#   docker build --target runtime  --build-arg TORCH_VARIANT=cu128 -t shipyard/runtime:0.1.0-cu128 .   # CUDA 12.8
#
# A model image adds the model to the runtime image (FROM shipyard/runtime:..., COPY my-model /models/my-model);
# its tag is the version Shipyard rolls out. Both images run as the non-root user 10001. The base image is pinned
# by exact tag; pin it by digest too with --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>.
# docs/packaging.md has the measured size of the operator image and the kind script (hack/kind-e2e.sh).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build stages: a virtual environment in /opt/venv ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# One distribution per image, and the contract both share (see pyproject.toml): each stage installs only its own.
COPY contract/ contract/

FROM build AS operator-build
# shipyard-operator and shipyard-contract: Kopf, lightkube, prometheus-client, aiohttp, PyYAML, pydantic. No torch.
# pip and setuptools are not needed at run time (about 23 MB of the venv).
COPY operator/ operator/
RUN pip install --no-compile ./contract ./operator \
 && python -c "import sys, shipyard.operator.handlers; assert 'torch' not in sys.modules" \
 && python -m pip uninstall --yes pip setuptools

FROM build AS runtime-build
# cpu, or a CUDA build of torch such as cu128 (its CUDA libraries come as wheels; the driver comes from the node).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# shipyard-runtime and shipyard-contract, from their source: their dependencies are pinned in runtime/pyproject.toml.
# A CUDA variant (cu*) also gets the `gpu` extra (nvidia-ml-py: NVML, for the GPU utilisation gauge; the driver comes
# from the node). Nothing of the operator (Kopf, lightkube, aiohttp) is installed.
COPY runtime/ runtime/
# hadolint ignore=DL3013
RUN pip install --no-compile --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
 && pip install --no-compile ./contract ./runtime \
 && case "${TORCH_VARIANT}" in cu*) pip install --no-compile "./runtime[gpu]" && python -c "import pynvml" ;; esac \
 && python -c "import sys, torch, shipyard.runtime.cli; assert not {'kopf', 'lightkube', 'aiohttp'} & set(sys.modules); print('torch', torch.__version__)"

# --- final stages ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 shipyard \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin shipyard
WORKDIR /tmp

FROM base AS runtime
# A C++ compiler: the compression Job builds the model's AOTInductor package with it (spec.compression.compiled.mode
# auto, the default, serves it where it is faster than the eager model; without a compiler the Job serves eager).
RUN apt-get update \
 && apt-get install --yes --no-install-recommends g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=runtime-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["shipyard-runtime"]
CMD ["serve"]

# The operator is the last stage, so that a plain `docker build .` builds it.
FROM base AS operator
COPY --from=operator-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8081 9090
ENTRYPOINT ["shipyard-operator"]
CMD ["--all-namespaces"]
