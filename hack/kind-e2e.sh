#!/usr/bin/env bash
# End-to-end on kind, for users with Docker: builds the operator and runtime images and a model image, loads them
# into a kind cluster, installs the chart, runs `helm test`, applies examples/digits.yaml and waits until it is
# Ready (compression Job, then the inference pods), then sends one inference through its Service.
# NOT run by this repository's CI (there is no Docker engine there; CI uses the local control plane instead).
#
#   hack/kind-e2e.sh                 # everything, then deletes the kind cluster
#   KEEP=1 hack/kind-e2e.sh          # leave the cluster running (kind delete cluster --name shipyard-e2e)
#   TORCH_VARIANT=cu128 ...          # CUDA runtime image (needs a GPU node; kind has none by default)
#
# Needs: docker, kind, kubectl, helm (3.x). Takes several minutes (the runtime image installs torch).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${CLUSTER:-shipyard-e2e}
tag=${TAG:-$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/shipyard/Chart.yaml)}
variant=${TORCH_VARIANT:-cpu}
model_image=registry.example/shipyard/digits-model:1.0.0   # the image examples/digits.yaml names
namespace=shipyard-system
models=ml
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31mkind-e2e: %s\033[0m\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm; do command -v "$tool" >/dev/null || die "$tool is required"; done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable"

work=$(mktemp -d)
cleanup() {
  rc=$?
  rm -rf "$work"
  if [ "${KEEP:-0}" = 1 ]; then
    say "Left running (KEEP=1): kind delete cluster --name $cluster"
  else
    say "Deleting the kind cluster $cluster"
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  [ "$rc" = 0 ] || echo "kind-e2e failed (exit $rc)" >&2
}
trap cleanup EXIT

say "Building the images (operator, runtime with $variant torch)"
docker build --target operator -t "shipyard/operator:$tag" .
docker build --target runtime --build-arg "TORCH_VARIANT=$variant" -t "shipyard/runtime:$tag" .

say "Building the model image $model_image (the digits model, trained inside the runtime image)"
mkdir -p "$work/context"
docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp -v "$PWD/examples:/examples:ro" -v "$work/context:/out" \
  --entrypoint python "shipyard/runtime:$tag" /examples/models/build_models.py digits /out/digits
printf 'FROM shipyard/runtime:%s\nCOPY digits /models/digits\n' "$tag" > "$work/context/Dockerfile"
docker build -t "$model_image" "$work/context"

say "Creating the kind cluster $cluster and loading the images"
kind get clusters 2>/dev/null | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 120s
kubectl config use-context "kind-$cluster" >/dev/null
kind load docker-image --name "$cluster" "shipyard/operator:$tag" "shipyard/runtime:$tag" "$model_image"

say "Installing the chart, then helm test"
helm upgrade --install shipyard charts/shipyard -n "$namespace" --create-namespace \
  --set image.repository=shipyard/operator --set "image.tag=$tag" --set image.pullPolicy=Never --wait --timeout 5m
helm test shipyard -n "$namespace" --timeout 5m

say "Applying examples/digits.yaml with its artifacts volume"
kubectl create namespace "$models" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n "$models" -f - <<'PVC'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shipyard-artifacts}
spec:
  accessModes: [ReadWriteOnce]      # kind's local-path volumes; one node, so the Job and the pods share it
  resources: {requests: {storage: 1Gi}}
PVC
kubectl apply -n "$models" -f examples/digits.yaml
kubectl wait -n "$models" --for=condition=Ready modeldeployment/digits --timeout=15m
kubectl get -n "$models" modeldeployment digits -o wide

say "One inference through the Service"
kubectl port-forward -n "$models" service/digits 18080:8080 >/dev/null 2>&1 &
forward=$!
sleep 3
row=$(python3 -c 'print(",".join(["0.5"] * 64))')
curl -sf -X POST localhost:18080/v2/models/digits/infer -H 'content-type: application/json' \
  -d "{\"inputs\": [{\"name\": \"input\", \"datatype\": \"FP32\", \"shape\": [1, 64], \"data\": [$row]}]}"
echo
kill "$forward"
say "kind e2e passed"
