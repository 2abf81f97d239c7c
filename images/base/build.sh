#!/usr/bin/env bash
# Builds a minimal Debian bookworm image with Python 3.11, from Debian's packages, with no image
# registry: debootstrap into a folder, then `docker import`. The controller image builds FROM it
# here; on a machine that can pull, `docker build` uses the official python image instead.
#   images/base/build.sh [TAG]     default tag: agentainer/debian-python:bookworm
set -euo pipefail

TAG=${1:-agentainer/debian-python:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}

if docker image inspect "$TAG" >/dev/null 2>&1; then exit 0; fi
command -v debootstrap >/dev/null || {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || {
        echo "base: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    apt-get install -y -qq debootstrap >/dev/null
}
root=$(mktemp -d "${TMPDIR:-/tmp}/agentainer-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$CACHE/debootstrap"
echo "==> debootstrap bookworm with python3 into $root (log: $CACHE/debootstrap.log)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --cache-dir="$CACHE/debootstrap" bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
# Smaller: no apt lists, docs or man pages in an image nobody runs apt in.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
echo "==> $TAG" >&2
