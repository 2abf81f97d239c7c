#!/usr/bin/env bash
# Builds the controller image offline: wheels of the package and its dependencies on the host,
# a base image built from Debian's packages (images/base/build.sh) unless BASE_IMAGE names one.
#   scripts/build-controller-image.sh [TAG]    default: agentainer/controller:dev
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-agentainer/controller:dev}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-agentainer/debian-python:bookworm}
cd "$ROOT"
if [ "$BASE_IMAGE" = agentainer/debian-python:bookworm ]; then images/base/build.sh python >/dev/null; fi
rm -rf dist/wheels && mkdir -p dist/wheels
# async-timeout too: redis needs it on Pythons before 3.11.3 (Debian bookworm has 3.11.2).
"$PYTHON" -m pip wheel -q --wheel-dir dist/wheels . "async-timeout>=4.0.3" >/dev/null
DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_ARGS="--no-index --find-links /src/dist/wheels" \
    --build-arg PACKAGE=agentainer-operator -t "$TAG" . >/dev/null
echo "$TAG"
