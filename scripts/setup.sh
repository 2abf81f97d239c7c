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

# alive PID [NAME]: the process PID runs (not a zombie), and is the program NAME when one is given.
alive() {
    local state
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    state=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# gone PID NAME SECONDS: waits until PID is no longer NAME; false when it still is at the deadline.
gone() {
    local deadline=$((SECONDS + $3))
    while alive "$1" "$2"; do
        [ $SECONDS -ge "$deadline" ] && return 1
        sleep 0.5
    done
}

# stop PID NAME: asks PID to stop, and kills it when it has not within 30 s.
stop() {
    alive "$1" "$2" || return 0
    say "stopping $2 (pid $1)"
    kill -TERM "$1" 2>/dev/null || true
    gone "$1" "$2" 30 && return 0
    kill -KILL "$1" 2>/dev/null || true
    gone "$1" "$2" 10 || die "$2 (pid $1) did not end within 40s of being told to stop"
}

# What an engine stopped mid-way leaves (a machine whose processes were killed, then restarted):
# dockerd trusts the pid files of itself and of the containerd it runs, so a file naming a
# process that is ending, gone or another program makes it refuse to start, or wait a minute for
# a containerd socket nobody serves. An engine that runs but does not answer is given 30 s to.
# docker_leftovers [failed]: failed, after a dockerd that did not come up.
docker_leftovers() {
    local pid deadline containerd=/var/run/docker/containerd
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if alive "$pid" dockerd; then
        say "dockerd (pid $pid) runs but does not answer; waiting up to 30s for it to answer or end"
        deadline=$((SECONDS + 30))
        while alive "$pid" dockerd && [ $SECONDS -lt $deadline ]; do
            docker_answers && return 0
            sleep 1
        done
        stop "$pid" dockerd
    fi
    rm -f /var/run/docker.pid
    pid=$(cat "$containerd/containerd.pid" 2>/dev/null || true)
    # Only the containerd dockerd runs, not another (the local Kubernetes node's, say).
    if alive "$pid" containerd && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null \
            | grep -q -- "--config $containerd/containerd.toml"; then
        # A containerd serving its socket is one a restarted dockerd takes on with its
        # containers (live-restore); one without a socket is on its way out, and one a dockerd
        # just failed to start with is stopped.
        if [ ! -S "$containerd/containerd.sock" ] || [ "${1:-}" = failed ]; then
            gone "$pid" containerd 30 || stop "$pid" containerd
            rm -f "$containerd/containerd.pid"
        fi
    else
        rm -f "$containerd/containerd.pid"
    fi
}

docker_up() {
    docker_answers && return 0
    if [ -n "${DOCKER_HOST:-}" ]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer; start that engine or unset DOCKER_HOST"
    fi
    is_root || die "no Docker engine answers and starting dockerd needs root; start Docker (Docker Desktop, or sudo systemctl start docker) and add yourself to the docker group"
    command -v dockerd >/dev/null || die "dockerd is not installed (scripts/setup.sh packages)"
    docker_leftovers
    docker_answers && return 0
    local engine deadline
    for _ in 1 2; do
        say "starting dockerd (log: $CACHE/dockerd.log)"
        # Outside systemd (containers, CI machines) nothing else starts it. live-restore: a
        # restarted engine finds its containers still running, as on a well-kept node.
        nohup dockerd --host unix:///var/run/docker.sock --live-restore >>"$CACHE/dockerd.log" 2>&1 &
        engine=$!
        deadline=$((SECONDS + 90))
        while [ $SECONDS -lt $deadline ] && alive "$engine"; do  # nohup, then dockerd
            docker_answers && return 0
            sleep 1
        done
        tail -n 30 "$CACHE/dockerd.log" >&2
        if alive "$engine"; then
            stop "$engine" "$(cat "/proc/$engine/comm" 2>/dev/null)"
            say "dockerd (pid $engine) did not answer within 90s"
        else
            say "dockerd (pid $engine) ended without answering"
        fi
        docker_leftovers failed
    done
    die "dockerd did not come up in two tries of 90s (its log: $CACHE/dockerd.log, last lines above)"
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
    # Three tries 5 s apart: a server still ending (a machine whose processes were just killed)
    # holds the port for a moment, and the new one then ends at once, saying so in the log.
    mkdir -p "$CACHE/redis"
    for _ in 1 2 3; do
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save '' --appendonly yes \
            --appendfsync everysec --dir "$CACHE/redis" --logfile "$CACHE/redis.log"
        for _ in $(seq 1 20); do
            [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return 0
            sleep 0.25
        done
    done
    tail -n 10 "$CACHE/redis.log" >&2
    die "redis-server did not answer on port $port in three tries of 5s (log above: $CACHE/redis.log)"
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
