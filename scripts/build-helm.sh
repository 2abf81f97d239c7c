#!/usr/bin/env bash
# Builds helm from the helm.sh/helm/v3 Go module (through the Go module proxy) into a cache
# outside the repository; does nothing when it is there. Prints the binary's path.
set -euo pipefail
HELM_VERSION=${HELM_VERSION:-v3.19.5}
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
BIN=$CACHE/helm/$HELM_VERSION/helm
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "build-helm: go is not installed" >&2; exit 1; }
echo "==> building helm $HELM_VERSION (first time only)" >&2
GOBIN=$(dirname "$BIN") go install -trimpath "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
echo "$BIN"
