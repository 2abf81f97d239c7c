#!/usr/bin/env bash
# Installs and starts what agentainer needs on this machine, each part only when it is missing.
#   scripts/setup.sh packages   Debian packages (as root on Debian; elsewhere says what is missing):
#                               Docker, Redis, busybox-static, and for the local Kubernetes node
#                               CNI plugins, iptables, gcc (the pause image), openssl, debootstrap
#   scripts/setup.sh demo       what `make demo` needs and no more: Docker, Redis and
#                               busybox-static, the venv, the images
#   scripts/setup.sh docker     a running Docker engine (starts dockerd when none answers)
#   scripts/setup.sh redis      a Redis answering at $AGENTAINER_REDIS_URL (for the demo)
#   scripts/setup.sh venv       .venv with agentainer and its test tools
#   scripts/setup.sh image      the agentainer/busybox agent image and the agentainer/runner
#                               image (the agents' task runner, a static C program built with
#                               zig's C compiler, from PyPI into the venv), offline
#   scripts/setup.sh all        all of the above but redis
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
REDIS_URL=${AGENTAINER_REDIS_URL:-redis://localhost:6379/0}
mkdir -p "$CACHE"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
on_debian() { command -v apt-get >/dev/null && command -v dpkg >/dev/null; }
have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }

# packages [demo]: every package, or (demo) those of Docker, Redis and the agent image only.
packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if [ "${1:-}" != demo ]; then
        # The local Kubernetes node: containerd and runc come with docker.io; CNI plugins do not.
        [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
        command -v iptables >/dev/null || missing+=(iptables)  # kube-proxy, the CNI firewall
        command -v ip >/dev/null || missing+=(iproute2)
        command -v gcc >/dev/null || missing+=(gcc libc6-dev)  # the node's pause image
        command -v openssl >/dev/null || missing+=(openssl)
        command -v debootstrap >/dev/null || missing+=(debootstrap)
    fi
    if on_debian; then
        have_pkg busybox-static || missing+=(busybox-static)
    elif [ ! -x "${AGENTAINER_BUSYBOX:-/bin/busybox}" ]; then
        missing+=(busybox-static)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if is_root && on_debian; then
        say "installing ${missing[*]} from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing: ${missing[*]}. Install them (on Debian/Ubuntu: sudo apt-get install ${missing[*]}), or run this as root on Debian."
    fi
}

docker_answers() { timeout 10 docker version >/dev/null 2>&1; }

docker_up() {
    docker_answers && return 0
    if [ -n "${DOCKER_HOST:-}" ]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer; start that engine or unset DOCKER_HOST"
    fi
    is_root || die "no Docker engine answers and starting dockerd needs root; start Docker (Docker Desktop, or sudo systemctl start docker) and add yourself to the docker group"
    command -v dockerd >/dev/null || die "dockerd is not installed (scripts/setup.sh packages)"
    say "starting dockerd (log: $CACHE/dockerd.log)"
    # Outside systemd (containers, CI machines) nothing else starts it. live-restore: a
    # restarted engine finds its containers still running, as on a well-kept node.
    nohup dockerd --host unix:///var/run/docker.sock --live-restore >>"$CACHE/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        docker_answers && return 0
        sleep 1
    done
    tail -n 30 "$CACHE/dockerd.log" >&2
    die "dockerd did not come up within 60s (log above)"
}

redis_up() {
    local port host
    if "$PYTHON" - "$REDIS_URL" <<'PY' 2>/dev/null; then return 0; fi
import socket, sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
socket.create_connection((u.hostname or "localhost", u.port or 6379), timeout=2).close()
PY
    host=$("$PYTHON" -c 'import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).hostname or "localhost")' "$REDIS_URL")
    port=$("$PYTHON" -c 'import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).port or 6379)' "$REDIS_URL")
    case "$host" in localhost|127.0.0.1) ;; *) die "Redis at $REDIS_URL does not answer; start it or set AGENTAINER_REDIS_URL" ;; esac
    command -v redis-server >/dev/null || die "redis-server is not installed (scripts/setup.sh packages)"
    say "starting redis-server on 127.0.0.1:$port (log: $CACHE/redis.log, data: $CACHE/redis)"
    # An append-only file, written every second: a Redis restarted keeps the workflows' state
    # (what the last second lost, the controller finds again in the agents' labels).
    mkdir -p "$CACHE/redis"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save '' --appendonly yes \
        --appendfsync everysec --dir "$CACHE/redis" --logfile "$CACHE/redis.log"
    for _ in $(seq 1 20); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "redis-server did not answer on port $port (log: $CACHE/redis.log)"
}

venv() {
    local stamp="$VENV/.agentainer-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$ROOT/pyproject.toml" ]; then return 0; fi
    say "installing agentainer and its test tools into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    touch "$stamp"
}

image() {
    local busybox=${AGENTAINER_BUSYBOX:-/bin/busybox} context=$ROOT/images/busybox
    [ -x "$busybox" ] || die "$busybox is missing (Debian: apt-get install busybox-static)"
    if ldd "$busybox" >/dev/null 2>&1; then
        die "$busybox is linked dynamically; the agent image needs the static one (busybox-static)"
    fi
    cp "$busybox" "$context/busybox"
    say "building agentainer/busybox:latest"
    DOCKER_BUILDKIT=0 docker build -q -t agentainer/busybox:latest "$context" >/dev/null 2>"$CACHE/image-build.log" \
        || { cat "$CACHE/image-build.log" >&2; die "building the agent image failed"; }
    runner_image
}

# The task runner of agents: a static C program (images/runner/runner.c) alone in an image,
# tagged with the package's version, which is the tag the controller looks for. Compiled by zig's
# C compiler against musl (a wheel from PyPI, in the venv), so that no C toolchain is needed.
ZIG_VERSION=0.17.1
runner_image() {
    local context=$ROOT/images/runner version
    version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/controller/__init__.py")
    [ -x "$VENV/bin/python" ] || venv
    if ! "$VENV/bin/python" -c "import ziglang" 2>/dev/null; then
        say "installing zig's C compiler (ziglang $ZIG_VERSION, from PyPI) into $VENV"
        "$VENV/bin/python" -m pip install -q "ziglang==$ZIG_VERSION"
    fi
    say "building agentainer/runner:$version"
    "$VENV/bin/python" -m ziglang cc -target "$(uname -m)-linux-musl" -static -O2 -s -Wall -Wextra -Werror \
        -o "$context/runner" "$context/runner.c" 2>"$CACHE/runner-build.log" \
        || { cat "$CACHE/runner-build.log" >&2; die "compiling the task runner failed"; }
    DOCKER_BUILDKIT=0 docker build -q -t "agentainer/runner:$version" "$context" >/dev/null 2>"$CACHE/image-build.log" \
        || { cat "$CACHE/image-build.log" >&2; die "building the runner image failed"; }
}

case "${1:-all}" in
    packages) packages ;;
    docker) docker_up ;;
    redis) redis_up ;;
    venv) venv ;;
    image) docker_up; image ;;
    demo) packages demo; docker_up; venv; image ;;
    all) packages; docker_up; venv; image ;;
    *) die "unknown part '$1' (packages, demo, docker, redis, venv, image, all)" ;;
esac
