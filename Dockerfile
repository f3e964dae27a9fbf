# glad-stream: the `glad` command (fit, score, eval, run, stage, status, models) in one image.
#
#   docker build -t glad-stream .
#   docker run --rm glad-stream --help
#
# CPU by default: torch and torchvision come from the PyTorch CPU wheel index (no CUDA libraries,
# a much smaller image). Every stage worker is `glad stage NAME ...`; see compose.yaml and
# docs/deployment.md.
#
# CUDA variant (GPU workers for extract/score, run with `--device cuda`):
#   - simplest: the same Dockerfile with CUDA wheels, which bundle the CUDA runtime and cuDNN as
#     pip packages; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit:
#       docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t glad-stream:cuda .
#     (pick the cuXYZ index your driver supports);
#   - or base the image on a CUDA runtime image instead of python:3.11-slim-bookworm, e.g.
#     `FROM pytorch/pytorch:<version>-cuda12.x-cudnn9-runtime` (torch preinstalled: drop the torch
#     step below if its version is within pyproject's range) or
#     `FROM nvidia/cuda:12.x-cudnn-runtime-ubuntu22.04` plus a Python 3.11 install.
#   Then start the workers with `glad stage extract|score ... --device cuda` and give the container
#   the GPU (`docker run --gpus all`, or the `deploy.resources.reservations.devices` block shown in
#   compose.yaml).

# Debian bookworm pinned: on trixie the glib package is renamed libglib2.0-0t64.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# opencv-python-headless needs glib at run time (video decoding: FFmpeg is inside its wheel).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen wheel index, in pyproject's range; `pip install .` then keeps it.
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY glad ./glad
COPY pipeline ./pipeline
COPY stages ./stages
COPY online ./online
COPY dashboard ./dashboard
RUN pip install . && rm -rf build ./*.egg-info

# Non-root user. /models, /results and /data exist (owned by it) so that named volumes mounted
# there start with the right owner; /app is writable for the CLI's relative defaults (glad-data/).
RUN useradd --create-home --uid 1000 --user-group glad \
    && mkdir -p /models /results /data \
    && chown glad:glad /models /results /data /app
USER glad

ENTRYPOINT ["glad"]
CMD ["--help"]
