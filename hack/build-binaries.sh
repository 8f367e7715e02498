#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from Go modules into a per-machine cache, once per version.
# kubectl is built at the cluster's own version: a machine's kubectl may be several minors away (outside
# kubectl's supported skew of one minor), and hack/cluster.py up puts this one first on PATH.
#   SHIPYARD_CACHE (default ~/.cache/shipyard) / bin / <component>-<version> / <binary>
# Prints the bin directory of each component on success. Idempotent: a built version is reused.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${SHIPYARD_CACHE:-$HOME/.cache/shipyard}
mkdir -p "$cache/bin" "$cache/build"
# One build at a time per machine (parallel test sessions or shells wait for the first).
exec 9>"$cache/build.lock"
flock 9
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

log() { printf '[build-binaries] %s\n' "$*" >&2; }

built() { [ -x "$1" ] && [ -f "$1.ok" ]; }

build_kube() {
  local out="$cache/bin/kubernetes-$KUBE_VERSION"
  local components=(kube-apiserver kube-controller-manager kube-scheduler kubectl) missing=() c
  for c in "${components[@]}"; do built "$out/$c" || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local staging_version="v0.${KUBE_VERSION#v1.}"
  local mod="$cache/build/kubernetes-$KUBE_VERSION"
  rm -rf "$mod"; mkdir -p "$mod" "$out"
  log "Resolving k8s.io/kubernetes@$KUBE_VERSION"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local gover
  gover=$(awk '$1=="go"{print $2; exit}' "$gomod")
  {
    echo "module shipyard.local/kube-build"
    echo
    echo "go $gover"
    echo
    grep '^godebug' "$gomod" || true
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    # Every staging module the release replaces with ./staging/... is pinned to its published tag.
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools
GO
  local pkgs=("${missing[@]/#/k8s.io/kubernetes/cmd/}")
  (cd "$mod" && go get "${pkgs[@]/%/@$KUBE_VERSION}" >&2)
  local pkg="k8s.io/component-base/version"
  local ldflags="-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
  for c in "${missing[@]}"; do
    log "Building $c $KUBE_VERSION"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$out/$c" "k8s.io/kubernetes/cmd/$c")
    touch "$out/$c.ok"
  done
}

build_etcd() {
  local out="$cache/bin/etcd-$ETCD_VERSION"
  built "$out/etcd" && return 0
  local mod="$cache/build/etcd-$ETCD_VERSION"
  rm -rf "$mod"; mkdir -p "$mod" "$out"
  log "Building etcd $ETCD_VERSION"
  printf 'module shipyard.local/etcd-build\n\ngo 1.25\n' > "$mod/go.mod"
  (cd "$mod" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 \
    && go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
  touch "$out/etcd.ok"
}

build_go_install() { # name module-path version
  local name=$1 path=$2 version=$3
  local out="$cache/bin/$name-$version"
  built "$out/$name" && return 0
  mkdir -p "$out"
  log "Building $name $version"
  local ldflags="-s -w"
  if [ "$name" = helm ]; then
    ldflags="$ldflags -X helm.sh/helm/v3/internal/version.version=$version"
  fi
  GOBIN="$out" GOFLAGS= go install -trimpath -ldflags "$ldflags" "$path@$version"
  touch "$out/$name.ok"
}

start=$(date +%s)
build_etcd
build_kube
build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
log "All binaries present in $cache/bin ($(( $(date +%s) - start )) s)"
