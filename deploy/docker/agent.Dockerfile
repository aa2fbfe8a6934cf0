# syntax=docker/dockerfile:1
# harp-agent: serves one GPU to Elastic GPU kernels (deploy/base runs one per GPU).
#   docker build -f deploy/docker/agent.Dockerfile -t harp-agent:0.1.0 .      (from the repo root)
#   docker run --gpus 1 -p 5555:5555 -p 9400:9400 harp-agent:0.1.0 --listen tcp://0.0.0.0:5555

ARG CUDA_VERSION=13.0.1
ARG PYCUDA_VERSION=2026.1

# The project's wheel. Building it builds the lab extension (jlpm, tsc, rspack), which needs node;
# the agent image itself then needs no node.
FROM python:3.12-slim-bookworm AS wheel
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The devel image, not runtime: pycuda compiles against CUDA's headers here, and SourceModule runs
# nvcc on the agent at every new kernel source.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG PYCUDA_VERSION
# tini as PID 1: forwards SIGTERM to the agent (its graceful drain) and reaps the workers'
# orphaned children (nvcc, ptxas)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-dev python3-venv g++ tini \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/harp \
    PATH=/opt/harp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu's python is externally managed (PEP 668): the agent gets a venv of its own.
# The project's wheel is this build's own, so hadolint's version pinning does not apply.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    python3 -m venv /opt/harp \
 && pip install --no-cache-dir "pycuda==${PYCUDA_VERSION}" \
 && wheel="$(ls /tmp/wheels/harp_jupyter-*.whl)" \
 && pip install --no-cache-dir "${wheel}[agent]"
# the uid and gid the manifests run as (runAsUser 10001); the directories are the defaults
# of the manifests' park dir and cache, for plain `docker run` where no volume is mounted
RUN groupadd --gid 10001 harp \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/harp --shell /usr/sbin/nologin harp \
 && mkdir -p /var/lib/harp/park /var/cache/harp \
 && chown -R harp:harp /var/lib/harp /var/cache/harp
ENV XDG_CACHE_HOME=/var/cache/harp
USER 10001:10001
WORKDIR /home/harp
EXPOSE 5555 5600-5663 9400
ENTRYPOINT ["/usr/bin/tini", "--", "harp-agent"]
CMD ["--listen", "tcp://0.0.0.0:5555", "--metrics-port", "9400", "--park-dir", "/var/lib/harp/park"]
