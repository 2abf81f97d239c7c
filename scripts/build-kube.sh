#!/usr/bin/env bash
# Builds Kubernetes server binaries from the k8s.io/kubernetes Go module, through the Go module
# proxy, into a cache outside the repository; does nothing when the binary is already there.
#   scripts/build-kube.sh            prints the path of the kube-apiserver binary (a link to the
#                                    multi-call binary `kube`)
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces its staging modules with local
# folders), so a small wrapper module of ours requires it and replaces every staging module
# `k8s.io/foo v0.0.0` with the published `k8s.io/foo v0.MINOR.PATCH`.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.34.4}
CACHE=${AGENTAINER_CACHE:-$HOME/.cache/agentainer}
DIR=$CACHE/kube/$KUBE_VERSION
BIN=$DIR/bin/kube
say() { printf '==> %s\n' "$*" >&2; }

COMPONENTS="apiserver controller-manager scheduler kubelet proxy kubectl"
if [ -x "$BIN" ] && [ "$(cat "$DIR/bin/components" 2>/dev/null)" = "$COMPONENTS" ]; then
    echo "$DIR/bin/kube-apiserver"
    exit 0
fi
command -v go >/dev/null || { echo "build-kube: go is not installed" >&2; exit 1; }

staging_version=v0.${KUBE_VERSION#v1.}
src=$DIR/src
mkdir -p "$src" "$DIR/bin"
say "building Kubernetes $KUBE_VERSION server binaries (first time only; long on 2 cores)"

gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$gomod" ] || { echo "build-kube: could not download k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }

{
    echo "module agentainer.dev/kube"
    echo
    echo "go $(sed -n 's/^go //p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
} > "$src/go.mod"

cat > "$src/main.go" <<'GO'
// One binary for the Kubernetes server components, chosen by the name it is called by
// (a symlink) or by its first argument: kube apiserver --etcd-servers=...
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	_ "time/tzdata"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
)

var commands = map[string]func() *cobra.Command{
	"apiserver":          apiserver.NewAPIServerCommand,
	"controller-manager": controllermanager.NewControllerManagerCommand,
	"scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kubelet":            func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
	"proxy":              func() *cobra.Command { return proxy.NewProxyCommand() },
}

func main() {
	name := strings.TrimPrefix(filepath.Base(os.Args[0]), "kube-")
	if _, ok := commands[name]; !ok && name != "kubectl" && len(os.Args) > 1 {
		name = os.Args[1]
		os.Args = append(os.Args[:1], os.Args[2:]...)
	}
	if name == "kubectl" {
		// As kubectl's own main: its verbosity before its flags are parsed, its error output.
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) // nolint:errcheck
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	command, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "usage: kube COMPONENT [flags]; components: apiserver, "+
			"controller-manager, scheduler, kubelet, proxy, kubectl\n")
		os.Exit(2)
	}
	os.Exit(cli.Run(command()))
}
GO

cd "$src"
go mod tidy >/dev/null 2>"$DIR/tidy.log" || { cat "$DIR/tidy.log" >&2; exit 1; }
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1"
    ldflags="$ldflags -X $pkg.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
    ldflags="$ldflags -X $pkg.gitTreeState=clean"
done
start=$(date +%s)
go build -trimpath -ldflags "$ldflags" -o "$BIN.tmp" .
mv "$BIN.tmp" "$BIN"
for component in $COMPONENTS; do
    [ "$component" = kubectl ] || ln -sf kube "$DIR/bin/kube-$component"
done
ln -sf kube "$DIR/bin/kubectl"
echo "$COMPONENTS" > "$DIR/bin/components"
ln -sf kube "$DIR/bin/kubelet"
say "built $BIN in $(( $(date +%s) - start ))s"
echo "$DIR/bin/kube-apiserver"
