# deepnets GPU image: `docker build -t deepnets .`, then
#   docker run --gpus all -v "$PWD/runs:/app/runs" -v "$PWD/data:/app/data" deepnets --config resnet.yaml
#
# The PyPI torch wheel bundles its own CUDA and cuDNN libraries (nvidia-* wheels), so the
# base only needs to bring the container toolkit's driver hooks and a glibc; its CUDA
# version matches the wheel's (torch 2.14 on PyPI is built for CUDA 13.0, driver >= 580).
# Nothing below needs more from the base than apt and, if it has none, Python >= 3.10 with
# venv, so `--build-arg BASE_IMAGE=debian:bookworm` (or a local Debian image, see
# scripts/docker_check.sh) builds the same image without a GPU stack.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# The uid that owns /app/runs and /app/data: match the host user who owns the mounted
# directories (`--build-arg UID=$(id -u)`), or run with `--user $(id -u):$(id -g)`.
ARG UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python only where the base lacks a usable one (the CUDA images ship none). Versions are
# left to the base's distribution: the same line must work on Ubuntu and Debian.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && if getent passwd "$UID" >/dev/null; then userdel --remove "$(getent passwd "$UID" | cut -d: -f1)" 2>/dev/null || true; fi \
    && useradd --create-home --uid "$UID" --shell /bin/bash deepnets

WORKDIR /app

# Dependencies first, from pyproject.toml alone (a stub package stands in for the source),
# so editing the code does not re-download torch.
COPY pyproject.toml ./
RUN mkdir -p deepnets \
    && touch deepnets/__init__.py \
    && pip install . \
    && pip uninstall -y deepnets \
    && rm -rf deepnets build ./*.egg-info

# The project itself: package, train.py, configs (see .dockerignore for what stays out).
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && mkdir -p /app/data /app/runs \
    && chown deepnets:deepnets /app/data /app/runs

USER ${UID}
VOLUME ["/app/data", "/app/runs"]

ENTRYPOINT ["python", "train.py"]
CMD ["--config", "resnet.yaml"]
