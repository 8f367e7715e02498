#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) and the S3-compatible server the tests fetch models from (versitygw, run by
# hack/s3.py), the OCI registry (CNCF distribution's `registry`, run by hack/registry.py) and the oras CLI that
# pushes model artifacts to it, from Go modules into a per-machine cache, once per version.
# Opt-in extras, named as arguments (or SHIPYARD_BUILD_<NAME>=1), are built after that core set:
#   keda  KEDA's operator and metrics adapter (keda-operator, keda-adapter; a cold build is long, see
#         docs/e2e.md), run on the host by hack/keda.py.
#   e.g. hack/build-binaries.sh keda
# kubectl is built at the cluster's own version: a machine's kubectl may be several minors away (outside
# kubectl's supported skew of one minor), and hack/cluster.py up puts this one first on PATH.
#   SHIPYARD_CACHE (default ~/.cache/shipyard) / bin / <component>-<version> / <binary>
# Prints the bin directory of each component on success. Idempotent: a built version is reused.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
extras=" $* "
[ "${SHIPYARD_BUILD_KEDA:-0}" = 1 ] && extras="$extras keda "
for x in $extras; do
  case $x in keda) ;; *) printf '[build-binaries] unknown component %s (known: keda)\n' "$x" >&2; exit 2 ;; esac
done
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
  case $name in
    helm) ldflags="$ldflags -X helm.sh/helm/v3/internal/version.version=$version" ;;
    # Build and BuildTime keep their defaults: the module zip carries no commit, and a date would vary the binary.
    versitygw) ldflags="$ldflags -X main.Version=$version" ;;
    registry) ldflags="$ldflags -X github.com/distribution/distribution/v3/version.version=$version" ;;
  esac
  GOBIN="$out" GOFLAGS= go install -trimpath -ldflags "$ldflags" "$path@$version"
  touch "$out/$name.ok"
}

# Builds a module whose go.mod has replace/exclude directives (which `go install m@v` refuses) through a
# generated wrapper module, like build_kube: the release's go line, `require module version`, and every
# replace and exclude directive (single-line and block form) copied verbatim. A directory replace
# (`=> ./...`) points into the release's own tree, which the module zip may lack: refused loudly.
# The go commands run under nice -n 19 (these builds are long and the machines are small).
build_wrapped() { # name module version binary=package-subpath ...   (LDFLAGS_EXTRA: more -X flags)
  local name=$1 module=$2 version=$3; shift 3
  local out="$cache/bin/$name-$version" mod="$cache/build/$name-$version" b missing=()
  for b in "$@"; do built "$out/${b%%=*}" || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  rm -rf "$mod"; mkdir -p "$mod" "$out"
  log "Resolving $module@$version"
  local gomod
  gomod=$(nice -n 19 go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  if grep -Eq '=>[[:space:]]*(\.{1,2}(/|[[:space:]]|$)|/)' "$gomod"; then
    log "$module@$version replaces a module with a directory of its own tree, which a wrapper cannot build:"
    grep -E '=>[[:space:]]*(\.{1,2}(/|[[:space:]]|$)|/)' "$gomod" >&2
    return 1
  fi
  {
    echo "module shipyard.local/$name-build"; echo
    awk '$1=="go"{print; exit}' "$gomod"; echo
    echo "require $module $version"; echo
    awk '/^(replace|exclude)[[:space:]]*\(/{on=1; print; next}
         on{print; if ($0 ~ /^[[:space:]]*\)/) on=0; next}
         /^(replace|exclude)[[:space:]]/{print}' "$gomod"
  } > "$mod/go.mod"
  local pkgs=()
  for b in "${missing[@]}"; do pkgs+=("$module/${b#*=}@$version"); done
  (cd "$mod" && nice -n 19 go get "${pkgs[@]}" >&2)
  for b in "${missing[@]}"; do
    log "Building ${b%%=*} $version"
    (cd "$mod" && nice -n 19 go build -trimpath -ldflags "-s -w ${LDFLAGS_EXTRA:-}" -o "$out/${b%%=*}" "$module/${b#*=}")
    touch "$out/${b%%=*}.ok"
  done
}

build_traefik() {
  # Codename and BuildDate keep their defaults: the module zip carries neither. Its web UI is built with npm
  # upstream and absent from the module zip: the dashboard is empty, routing and the API are whole.
  LDFLAGS_EXTRA="-X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
    build_wrapped traefik github.com/traefik/traefik/v3 "$TRAEFIK_VERSION" traefik=cmd/traefik
}

build_keda() {
  # GitCommit stays empty: the module zip carries no commit.
  local v=${KEDA_VERSION#v} pkg=github.com/kedacore/keda/v2/version
  LDFLAGS_EXTRA="-X $pkg.Version=$v" \
    build_wrapped keda github.com/kedacore/keda/v2 "$KEDA_VERSION" \
    keda-operator=cmd/operator keda-adapter=cmd/adapter
}

start=$(date +%s)
build_etcd
build_kube
build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_go_install versitygw github.com/versity/versitygw/cmd/versitygw "$VERSITYGW_VERSION"
build_go_install registry github.com/distribution/distribution/v3/cmd/registry "$DISTRIBUTION_VERSION"
build_go_install oras oras.land/oras/cmd/oras "$ORAS_VERSION"
build_traefik
case $extras in *" keda "*) build_keda ;; esac
log "All binaries present in $cache/bin ($(( $(date +%s) - start )) s)"
