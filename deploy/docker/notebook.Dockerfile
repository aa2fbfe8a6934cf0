# syntax=docker/dockerfile:1
# harp-notebook: the CPU-only single-user image for JupyterHub: JupyterLab, the Elastic GPU kernel,
# the sidebar and the pycuda shim. No CUDA here: GPU work goes to the agents.
#   docker build -f deploy/docker/notebook.Dockerfile -t harp-notebook:0.1.0 .  (from the repo root)

# The project's wheel, with its lab extension built (needs node, which the notebook image does
# not: the built extension ships inside the wheel).
FROM python:3.12-slim-bookworm AS wheel
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Jupyter's own base image: user jovyan (uid 1000), jupyterhub-singleuser, the start scripts
# Zero to JupyterHub expects.
FROM quay.io/jupyter/base-notebook:python-3.12
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The wheel installs the Elastic GPU kernelspec, the lab extension and the server extension
# into this environment; it is this build's own, so hadolint's version pinning does not apply
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    wheel="$(ls /tmp/wheels/harp_jupyter-*.whl)" \
 && pip install --no-cache-dir "${wheel}[lab]" \
 && jupyter kernelspec list \
 && jupyter labextension list 2>&1 | grep -q "harp-jupyter.*enabled"
