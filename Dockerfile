# syntax=docker/dockerfile:1.7
#
# Ember container image: the `ember` command with the server and training extras, plus the bundled
# default model. One Dockerfile, two variants chosen by a build argument:
#
#   docker build -t ember:gpu .                          # CUDA runtime base, CUDA torch wheels
#   docker build --build-arg VARIANT=cpu -t ember:cpu .  # plain Ubuntu, CPU torch wheels
#
# Both bases are Ubuntu 24.04 with its Python 3.12 at /usr/bin/python3, so the virtualenv built in
# the builder stage runs unchanged in the final stage.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS os-gpu
FROM ${CPU_IMAGE} AS os-cpu

# ---- the Python runtime shared by the builder and the final image -------------------------------
# The stage names below resolve to the two pinned images above.
# hadolint ignore=DL3006
FROM os-${VARIANT} AS python-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Distribution packages follow the pinned base image; pinning their versions too would break the
# build on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a self-contained virtualenv at /opt/ember/venv (pip removed once it is filled) ----
FROM python-base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.11.0
ARG TORCH_CUDA=cu130
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ember/venv
ENV PATH=/opt/ember/venv/bin:$PATH
# torch first, from the index that matches the variant, so the project install below finds it
# satisfied instead of pulling the default (CUDA) build from PyPI.
RUN if [ "$VARIANT" = gpu ]; then index="$TORCH_CUDA"; else index=cpu; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
       --index-url "https://download.pytorch.org/whl/${index}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY training ./training
COPY clients ./clients
COPY ember_cli ./ember_cli
# The project's dependency ranges live in pyproject.toml; the built image (by tag or digest) is the
# reproducible artefact that gets promoted, not a rebuild.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server,train]" \
    && python -m pip uninstall --yes pip

# ---- final stage, per variant ---------------------------------------------------------------------
FROM python-base AS final-cpu

# Triton compiles a small C launcher for each kernel signature the first time it runs on a GPU
# (and torch.compile does the same for its kernels), so the GPU image keeps gcc, libc headers and
# the Python headers. Nothing else of a toolchain comes along (no make, git, pip caches or curl).
FROM python-base AS final-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM final-${VARIANT} AS final
ARG VARIANT
LABEL org.opencontainers.image.title="ember" \
      org.opencontainers.image.description="Ember LLM inference server and training stack (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid so Kubernetes can verify runAsNonRoot; /models and /adapters are created here
# and owned by it, so fresh named volumes mounted there start out writable by the training jobs.
RUN groupadd --system --gid 10001 ember \
    && useradd --system --uid 10001 --gid ember --create-home --home-dir /home/ember ember \
    && mkdir -p /models /adapters \
    && chown ember:ember /models /adapters

COPY --from=builder /opt/ember/venv /opt/ember/venv
COPY models /opt/ember/models
COPY configs /opt/ember/configs
COPY deploy/docker/healthcheck.py /opt/ember/healthcheck.py

ENV PATH=/opt/ember/venv/bin:$PATH \
    HOME=/home/ember \
    TRITON_CACHE_DIR=/home/ember/.cache/triton \
    EMBER_HOST=0.0.0.0 \
    EMBER_PORT=8000 \
    EMBER_MODEL=/opt/ember/models/ember-stories \
    EMBER_LORA_ROOT=/adapters

USER 10001:10001
WORKDIR /home/ember
VOLUME ["/models", "/adapters"]
EXPOSE 8000

# /health is 200 only once the engine is warm and 503 while draining; the start period covers
# model loading and warm-up so a slow start is not counted as failures.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "/opt/ember/healthcheck.py"]

# Exec form, no shell in between: SIGTERM from `docker stop` or the kubelet reaches the server
# itself and starts its graceful drain.
ENTRYPOINT ["ember"]
CMD ["serve"]
