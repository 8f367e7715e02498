#!/usr/bin/env bash
# Shipyard's main job on the embedded local cluster, end to end, from a fresh machine:
# start the control plane (built from pinned Go modules on first use), install the CRD, run the operator,
# apply the digits example, watch it become Ready, roll out a new image tag, and show the history.
# Everything is stopped at the end; KEEP=1 leaves the cluster and operator running (stop: make cluster-down).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
state=${SHIPYARD_CLUSTER_DIR:-$PWD/.cluster}
export SHIPYARD_CLUSTER_DIR=$state
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

operator_pid=
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    say "Left running. Stop with: kill $operator_pid; python3 hack/cluster.py down"
    return
  fi
  say "Cleaning up"
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null || true
  python3 hack/cluster.py down || true
}
trap cleanup EXIT

say "Starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK)"
eval "$(python3 hack/cluster.py up)"
kubectl get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.capacity.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'

say "Installing the ModelDeployment CRD"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established --timeout=60s crd/modeldeployments.shipyard.dev

say "Starting the operator (log: $state/operator.log)"
"$venv/bin/shipyard-operator" --all-namespaces --metrics-port 0 --liveness http://127.0.0.1:18081/healthz \
  > "$state/operator.log" 2>&1 &
operator_pid=$!

say "Applying examples/digits.yaml"
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
# The artifacts volume the compression Job writes to (a local PV: the fake nodes have no provisioner).
kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-shipyard-artifacts}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {path: $state/artifacts}
  claimRef: {namespace: demo, name: shipyard-artifacts}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shipyard-artifacts, namespace: demo}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: demo-shipyard-artifacts
  resources: {requests: {storage: 1Gi}}
YAML
kubectl apply -n demo -f examples/digits.yaml
kubectl wait -n demo --for=condition=Ready --timeout=120s modeldeployment/digits
kubectl get -n demo modeldeployment,deployments,services,pods -l shipyard.dev/model=digits 2>/dev/null || true
kubectl get -n demo modeldeployment digits

image=$(kubectl get -n demo modeldeployment digits -o jsonpath='{.spec.image}')
next="${image%:*}:1.1.0"
say "Rolling out a new version: $image -> $next"
kubectl patch -n demo modeldeployment digits --type merge -p "{\"spec\":{\"image\":\"$next\"}}"
sleep 1
# KWOK's fake pods serve no metrics: the analysis measures errors and the operator rolls the canary back, as it
# would for any version it cannot verify. Watch the steps until the rollout ends either way.
for _ in $(seq 1 120); do
  phase=$(kubectl get -n demo modeldeployment digits -o jsonpath='{.status.phase}')
  kubectl get -n demo modeldeployment digits -o wide --no-headers
  case "$phase" in Healthy|RolledBack) break ;; esac
  sleep 3
done
kubectl get -n demo modeldeployment digits -o jsonpath='{.status.message}{"\n"}'
kubectl get -n demo deployments -l shipyard.dev/model=digits -L shipyard.dev/version
say "History"
kubectl get -n demo modeldeployment digits -o jsonpath='{range .status.history[*]}{.version}{"\t"}{.outcome}{"\t"}{.time}{"\n"}{end}'
say "Events"
kubectl get -n demo events --field-selector involvedObject.kind=ModelDeployment --sort-by=.lastTimestamp

say "Done. To look around yourself, run with KEEP=1 and use:"
cat <<TXT
  export KUBECONFIG=$state/kubeconfig
  kubectl get md -A                      # phase, stable, candidate, ready
  kubectl describe md -n demo digits     # conditions, history, events
  kubectl explain modeldeployment.spec.rollout.analysis
TXT
