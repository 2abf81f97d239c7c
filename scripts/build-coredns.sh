#!/usr/bin/env bash
# Builds CoreDNS, the cluster DNS of the local cluster (scripts/cluster.py), from the
# github.com/coredns/coredns Go module through the Go module proxy, into a cache outside the
# repository; does nothing when it is there. Prints the binary's path.
# Only the plugins a cluster DNS needs are compiled in (CoreDNS's own way of a custom build:
# a main package that imports them and sets the directive order), which keeps the cloud
# providers' SDKs out of the build.
set -euo pipefail

COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
DIR=$CACHE/coredns/$COREDNS_VERSION
BIN=$DIR/coredns
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "build-coredns: go is not installed" >&2; exit 1; }
echo "==> building CoreDNS $COREDNS_VERSION (first time only)" >&2

src=$DIR/src
mkdir -p "$src"
cat > "$src/go.mod" <<EOF
module agentainer.dev/coredns

go 1.26

require github.com/coredns/coredns $COREDNS_VERSION
EOF
cat > "$src/main.go" <<'GO'
// CoreDNS with the plugins of a cluster DNS, in CoreDNS's directive order.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{
		"bind", "ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes",
	}
}

func main() {
	coremain.Run()
}
GO
cd "$src"
go mod tidy >/dev/null 2>"$DIR/tidy.log" || { cat "$DIR/tidy.log" >&2; exit 1; }
go build -trimpath -ldflags "-s -w" -o "$BIN.tmp" .
mv "$BIN.tmp" "$BIN"
echo "$BIN"
