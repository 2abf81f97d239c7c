#!/usr/bin/env bash
# Installs the chart on the local single-node cluster (scripts/cluster.py up --node, or
# `make cluster`) the way "Install on kind" does on kind: the controller and Redis images built
# here and loaded into the node, a volume for Redis's data, `helm upgrade --install`.
#   scripts/install-local.sh [HELM ARGS...]      e.g. --set defaultBackend=kubernetes
# Environment: KUBECONFIG (default: the local cluster's), RELEASE (agentainer),
# NAMESPACE (agentainer-system), TAG (dev: the controller image's tag).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
PYTHON=${PYTHON:-python3}
RELEASE=${RELEASE:-agentainer}
NAMESPACE=${NAMESPACE:-agentainer-system}
TAG=${TAG:-dev}
export KUBECONFIG=${KUBECONFIG:-$CACHE/cluster/kubeconfig}
# scripts/cluster.py keeps its kubeconfig in the cluster's folder.
cluster=$(dirname "$KUBECONFIG")
say() { printf '==> %s\n' "$*" >&2; }

helm=$("$ROOT/scripts/build-helm.sh")
# kubectl of the cluster's version, built with it.
PATH=$(dirname "$("$ROOT/scripts/build-kube.sh")"):$PATH
say "building the images"
controller=$("$ROOT/scripts/build-controller-image.sh" "agentainer/controller:$TAG")
redis=$("$ROOT/images/base/build.sh" redis)
say "loading $controller and $redis into the node"
"$PYTHON" "$ROOT/scripts/cluster.py" load --dir "$cluster" "$controller" "$redis"

# The bundled Redis's claim, bound to a folder of the node (kind's default storage class
# provisions the same kind of volume on kind).
case $RELEASE in *agentainer*) fullname=$RELEASE ;; *) fullname=$RELEASE-agentainer ;; esac
volume=$cluster/volumes/$NAMESPACE-$fullname-redis
mkdir -p "$volume"
chmod 0777 "$volume"  # Redis runs as uid 999
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $NAMESPACE-$fullname-redis
  labels: {app.kubernetes.io/instance: $RELEASE}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: $NAMESPACE, name: data-$fullname-redis-0}
  hostPath: {path: $volume, type: Directory}
YAML

say "helm upgrade --install $RELEASE in $NAMESPACE"
"$helm" upgrade --install "$RELEASE" "$ROOT/helm/agentainer" --namespace "$NAMESPACE" \
    --create-namespace --wait --timeout 5m \
    --set image.repository=agentainer/controller --set "image.tag=$TAG" \
    --set image.pullPolicy=Never \
    --set redis.image.repository="${redis%:*}" --set redis.image.tag="${redis##*:}" \
    --set redis.image.pullPolicy=Never "$@"
