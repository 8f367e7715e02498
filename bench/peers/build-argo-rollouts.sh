#!/usr/bin/env bash
# Builds the Argo Rollouts controller (the peer of bench/operator_scale.py) from its pinned Go module into the
# per-machine cache, once. Its go.mod replaces the Kubernetes staging modules; a module that depends on it must
# repeat those replace lines, so this script copies them from the release's own go.mod.
#   prints the binary's path
set -euo pipefail
version=${ARGO_ROLLOUTS_VERSION:-v1.10.1}
cache=${SHIPYARD_CACHE:-$HOME/.cache/shipyard}
out="$cache/bin/argo-rollouts-$version"
if [ -x "$out/rollouts-controller" ] && [ -f "$out/rollouts-controller.ok" ]; then
  echo "$out/rollouts-controller"; exit 0
fi
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
mod="$cache/build/argo-rollouts-$version"
rm -rf "$mod"; mkdir -p "$mod" "$out"
gomod=$(go mod download -json "github.com/argoproj/argo-rollouts@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
{
  echo "module shipyard.local/argo-rollouts-build"
  echo
  awk '$1=="go"{print; exit}' "$gomod"
  echo
  echo "require github.com/argoproj/argo-rollouts $version"
  echo
  awk '/^replace \(/{on=1; print; next} on{print} on && /^\)/{on=0}' "$gomod"
} > "$mod/go.mod"
(cd "$mod" && go get "github.com/argoproj/argo-rollouts/cmd/rollouts-controller@$version" >&2 \
  && go build -trimpath -ldflags "-s -w" -o "$out/rollouts-controller" github.com/argoproj/argo-rollouts/cmd/rollouts-controller)
touch "$out/rollouts-controller.ok"
echo "$out/rollouts-controller"
