#!/usr/bin/env bash
# Builds minimal Debian bookworm images from Debian's packages, with no image registry:
# debootstrap into a folder, then `docker import`. Where images can be pulled, the official
# images do the same job (python:3.11-slim-bookworm, redis:7.2).
#   images/base/build.sh [python]   agentainer/debian-python:bookworm, Python 3.11: the base of
#                                   the controller image here
#   images/base/build.sh redis      agentainer/redis:7.0-bookworm, Debian's redis-server: the
#                                   chart's bundled Redis on a cluster that cannot pull
# Prints the image's tag; does nothing when the image is already there.
set -euo pipefail

FLAVOR=${1:-python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
changes=(--change 'ENV LANG=C.UTF-8')
case $FLAVOR in
    python)
        TAG=agentainer/debian-python:bookworm
        include=python3,python3-venv,ca-certificates ;;
    redis)
        TAG=agentainer/redis:7.0-bookworm
        include=redis-server
        changes+=(--change 'WORKDIR /data' --change 'EXPOSE 6379'
                  --change 'CMD ["redis-server", "--protected-mode", "no"]') ;;
    *) echo "base: unknown image '$FLAVOR' (python or redis)" >&2; exit 2 ;;
esac

if docker image inspect "$TAG" >/dev/null 2>&1; then echo "$TAG"; exit 0; fi
command -v debootstrap >/dev/null || {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || {
        echo "base: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    apt-get install -y -qq debootstrap >/dev/null
}
root=$(mktemp -d "${TMPDIR:-/tmp}/agentainer-$FLAVOR.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$CACHE/debootstrap"
log=$CACHE/debootstrap-$FLAVOR.log
echo "==> debootstrap bookworm with $include into $root (log: $log)" >&2
debootstrap --variant=minbase --include="$include" \
    --cache-dir="$CACHE/debootstrap" bookworm "$root" "$MIRROR" >"$log" 2>&1 \
    || { tail -20 "$log" >&2; exit 1; }
# Smaller: no apt lists, docs or man pages in an image nobody runs apt in.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
if [ "$FLAVOR" = redis ]; then mkdir -p "$root/data"; fi
tar -C "$root" -c . | docker import "${changes[@]}" - "$TAG" >/dev/null
echo "==> $TAG" >&2
echo "$TAG"
