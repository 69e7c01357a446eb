# syntax=docker/dockerfile:1
# DiffusionGemma NIM: `dgemma serve` (the public gRPC front) on the NGC Triton Inference Server image, whose own
# tritonserver and Python backend (Python 3.12) host the model. Build: docker build -t diffusiongemma-nim:0.1.0 .
# Not built in this project's CI (no Docker engine there): tests/packaging checks this file statically and runs
# its entrypoint with its environment from the installed package. See docs/operations.md, "Container image".

# ---- build: a virtual environment of the image's own Python 3.12 holding the project and its dependencies
FROM nvcr.io/nvidia/tritonserver:25.10-py3 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY engine_build ./engine_build
# A non-editable install: the package, its data (the embedded tiny model under service/assets) and scripts,
# with the build extra (ModelOpt, transformers), so `dgemma build` runs in this image too (docs/build.md).
RUN python3 -m venv /opt/dgemma/venv \
 && /opt/dgemma/venv/bin/pip install --upgrade pip \
 && /opt/dgemma/venv/bin/pip install '.[build]' \
 && /opt/dgemma/venv/bin/python -c "import service, service.cli; assert (service.DEFAULT_CHECKPOINT / 'config.json').is_file()" \
 && /opt/dgemma/venv/bin/python -c "import engine_build.build, modelopt.torch.quantization"

# ---- runtime: the same base, the venv copied in (owned by root, read-only to the service user)
FROM nvcr.io/nvidia/tritonserver:25.10-py3 AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="diffusiongemma-nim" \
      org.opencontainers.image.description="DiffusionGemma inference microservice: Triton Inference Server + public gRPC API diffusiongemma.v1" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/diffusiongemma-nim" \
      org.opencontainers.image.documentation="https://github.com/example/diffusiongemma-nim/blob/main/docs/operations.md" \
      org.opencontainers.image.vendor="DiffusionGemma NIM maintainers" \
      org.opencontainers.image.base.name="nvcr.io/nvidia/tritonserver:25.10-py3"
# The service user, and the only paths it may write: its home and NIM_CACHE_PATH (rendered Triton model
# repository, Triton's log; a checkpoint or build is mounted there and named by NIM_MODEL_PATH).
# tini as PID 1 (Ubuntu's package): it reaps the zombies Triton's orphaned children leave (PID 1 inherits them) and
# forwards SIGTERM to `dgemma serve`, which drains and stops Triton itself (no -g: not to the whole group).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 dgemma \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/dgemma --create-home --shell /usr/sbin/nologin dgemma \
 && mkdir -p /opt/nim/.cache \
 && chown 10001:10001 /opt/nim/.cache
COPY --from=build /opt/dgemma/venv /opt/dgemma/venv
ENV PATH=/opt/dgemma/venv/bin:$PATH \
    HOME=/home/dgemma \
    NIM_CACHE_PATH=/opt/nim/.cache \
    NIM_SERVER_HOST=0.0.0.0 \
    NIM_SERVER_PORT=8000 \
    NIM_HTTP_PORT=8080 \
    NIM_METRICS_PORT=8002 \
    DGEMMA_SERVER=127.0.0.1:8000 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/opt/nim/.cache"]
WORKDIR /home/dgemma
USER 10001:10001
# gRPC, OpenAI-compatible HTTP, metrics
EXPOSE 8000 8080 8002
# grpc.health.v1 on the public port (DGEMMA_SERVER); exit 0 only when SERVING. Weight loading gets start-period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["dgemma", "health", "--timeout", "5"]
ENTRYPOINT ["tini", "--", "dgemma"]
CMD ["serve"]
