#!/usr/bin/env bash
# `make demo`: Shipyard's main job, all real, on one machine (needs root: pods run in their own mount namespaces).
# Starts the local control plane, the node agent (Node local-0: pods run as real processes; a Service proxy),
# Prometheus (Debian's package, installed if missing) and the operator; applies the digits ModelDeployment (the
# e2e variant of examples/digits.yaml) with its artifacts volume; shows the compression Job's report and a real
# inference through the Service; rolls out a good tag and then a bad one under steady load, the bad one rolled back
# on Prometheus data; then serves the same model from the stack's S3 server (versitygw) with 4 replicas that download
# it once (the node cache); then exact canary weights through the Gateway API: Traefik (hack/gateway.py) as the
# Gateway, examples/digits-gateway.yaml (an HTTPRoute and a ModelDeployment) in namespace demo-gateway, whose pods get
# real addresses in the node agent's pod network (--pod-network; the namespace is labelled
# shipyard.dev/pod-network=bridge, the other namespaces' pods stay on loopback), 1.1.0 at 5% (a 1-minute pause) then
# 50% (a manual step, promoted with the annotation), 2,000 requests through the gateway counted per version at each
# step, the preview header, the route after promotion. Everything is stopped at the end; KEEP=1 leaves it running
# and prints how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${VENV:-.venv}
py="$venv/bin/python"
state=${SHIPYARD_DEMO_DIR:-$repo/.demo}
ns=demo
gns=demo-gateway  # the Gateway API act's namespace (pod network)
pod_network=10.213.0.0/16
image=registry.example/shipyard/digits-model
started=$(date +%s)
say() { printf '\n\033[1m==> %s\033[0m (+%ds)\n' "$*" "$(( $(date +%s) - started ))"; }
die() { printf '\033[31mdemo: %s\033[0m\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the node agent bind-mounts volumes in each pod's own mount namespace"
# kubectl: hack/cluster.py up builds it at the cluster's version and puts it first on PATH. The rest: Debian packages
# (hack/debian-packages.txt), installed when missing.
bash hack/install-packages.sh openssl flock unshare setpriv mount /usr/bin/prometheus curl || die "missing packages"

agent_pid= operator_pid= load_pid=
stop_all() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null || true
  if [ -n "$agent_pid" ]; then  # stops its pods first (SIGTERM, grace period), then deletes node local-0
    kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  fi
  python3 hack/prometheus.py stop --dir "$state/prometheus" || true
  python3 hack/s3.py stop --dir "$state/s3" 2>/dev/null || true
  python3 hack/gateway.py stop --dir "$state/gateway" 2>/dev/null || true  # deletes its Gateway: before the cluster
  python3 hack/cluster.py down --dir "$state/cluster" || true
}
cleanup() {
  rc=$?
  if [ "${KEEP:-0}" = 1 ] && [ "$rc" = 0 ]; then
    say "Left running (KEEP=1). Stop everything with:"
    echo "  kill $operator_pid $agent_pid; python3 hack/prometheus.py stop --dir $state/prometheus; python3 hack/s3.py stop --dir $state/s3; python3 hack/gateway.py stop --dir $state/gateway; python3 hack/cluster.py down --dir $state/cluster"
    return
  fi
  say "Cleaning up (operator, node agent and its pods, Prometheus, the S3 server, Traefik, control plane)"
  stop_all
  [ "$rc" = 0 ] || echo "demo failed (exit $rc); logs: $state/agent.log, $state/operator.log, $state/agent/logs/"
}
trap cleanup EXIT

if [ -d "$state" ]; then
  say "Stopping a previous demo in $state"
  [ -f "$state/pids" ] && kill $(cat "$state/pids") 2>/dev/null && sleep 5 || true
  python3 hack/prometheus.py stop --dir "$state/prometheus" 2>/dev/null || true
  python3 hack/s3.py stop --dir "$state/s3" 2>/dev/null || true
  python3 hack/gateway.py stop --dir "$state/gateway" 2>/dev/null || true
  python3 hack/cluster.py down --dir "$state/cluster" >/dev/null 2>&1 || true
  rm -rf "$state"
fi
mkdir -p "$state"

say "Starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK)"
eval "$(python3 hack/cluster.py up --dir "$state/cluster")"
kubectl apply --server-side -f crds/ >/dev/null
for _ in $(seq 60); do  # a CRD just created has no conditions yet: kubectl wait errors instead of waiting
  kubectl wait --for=condition=Established --timeout=5s crd/modeldeployments.shipyard.dev >/dev/null 2>&1 && break
  sleep 1
done

say "Starting the node agent: node local-0 runs pods as real processes (log: $state/agent.log)"
echo "    (the first run on a machine trains the digits model that the local image catalogue 'contains')"
echo "    pod network $pod_network: pods of namespaces labelled shipyard.dev/pod-network=bridge get an address in it"
setsid "$py" hack/node_agent.py --kubeconfig "$KUBECONFIG" --workdir "$state/agent" --venv "$venv" \
  --taint-fake-nodes --prepare-images --pod-network "$pod_network" > "$state/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 600); do
  [ -f "$state/agent/agent-ready" ] && break
  kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$state/agent.log"; die "the node agent exited"; }
  sleep 1
done
[ -f "$state/agent/agent-ready" ] || die "the node agent was not ready in 600 s"
kubectl get nodes -o custom-columns='NODE:.metadata.name,TAINTS:.spec.taints[*].key,READY:.status.conditions[?(@.type=="Ready")].status'

say "Starting Prometheus (scrapes the pods every second)"
prometheus=$(python3 hack/prometheus.py start --dir "$state/prometheus" --targets "$state/agent/prometheus-targets.json")
echo "    $prometheus"

say "Starting the operator (log: $state/operator.log)"
mkdir -p "$state/model-cache" && chmod 1777 "$state/model-cache"  # the node's model cache (a hostPath)
setsid "$venv/bin/shipyard-operator" --all-namespaces --metrics-port 0 --liveness "" \
  --prometheus-address "$prometheus" --fetch-image registry.example/shipyard/runtime:0.1.0 \
  --model-cache-path "$state/model-cache" > "$state/operator.log" 2>&1 &
operator_pid=$!
echo "$operator_pid $agent_pid" > "$state/pids"

columns='PHASE:.status.phase,STABLE:.status.stableVersion,CANDIDATE:.status.candidateVersion,STEP:.status.currentStepIndex,MESSAGE:.status.message'
show_ns=$ns
show() {  # prints md/digits' line (in $show_ns) whenever it changes, until jsonpath $1 equals $2 (or $3 s pass)
  local last="" line deadline=$(( $(date +%s) + ${3:-600} ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    line=$(kubectl get md -n $show_ns digits --no-headers -o custom-columns="$columns" 2>/dev/null || true)
    [ "$line" != "$last" ] && printf '    %s  %s\n' "$(date +%T)" "$line" && last=$line
    [ "$(kubectl get md -n $show_ns digits -o jsonpath="$1" 2>/dev/null)" = "$2" ] && return 0
    sleep 1
  done
  die "timed out waiting for $1 = $2"
}
apply_tag() { "$py" -m tests.e2e.manifests "$1" | kubectl apply -n $ns --server-side --field-manager=demo -f - >/dev/null; }
start_load() {
  "$py" -m tests.e2e.loadgen --port "$port" --rate 20 --seconds 300 > "$state/load.txt" 2>&1 &
  load_pid=$!
}
stop_load() { kill "$load_pid" 2>/dev/null; wait "$load_pid" 2>/dev/null || true; load_pid=; sed 's/^/    /' "$state/load.txt"; }

say "Applying the digits ModelDeployment ($image:1.0.0) and its artifacts volume"
kubectl create namespace $ns >/dev/null
"$py" - "$state/agent/pvc/$ns/shipyard-artifacts" <<'PY' | kubectl apply -f - >/dev/null
import json, pathlib, sys
from tests.modules import load_file
agent = load_file("shipyard_hack_node_agent", pathlib.Path("hack/node_agent.py"))
print(json.dumps({"apiVersion": "v1", "kind": "List",
                  "items": agent.build_local_volume("demo", "shipyard-artifacts", sys.argv[1])}))
PY
apply_tag 1.0.0
show '{.status.phase}' Healthy 900
kubectl get -n $ns pods -o wide

say "The compression report (the Job's termination message, and report.json on the volume)"
job=$(kubectl get jobs -n $ns -l shipyard.dev/component=compression -o jsonpath='{.items[0].metadata.name}')
kubectl get pods -n $ns -l job-name="$job" -o jsonpath='{.items[0].status.containerStatuses[0].state.terminated.message}' | fold -w 110 -s | sed 's/^/    /'
echo
"$py" - "$state/agent/pvc/$ns/shipyard-artifacts/$ns/digits" <<'PY'
import json, pathlib, sys
for report in sorted(pathlib.Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(report.read_text())
    print(f"    {report.parent}")
    print(f"    bytes {r['bytes']['before']} -> {r['bytes']['after']}, parameters {r['parameters']['before']} -> "
          f"{r['parameters']['after']}, accuracy {r['accuracy']['before']:.4f} -> {r['accuracy']['after']:.4f}, "
          f"steps {', '.join(s.get('kind', s.get('name', '?')) for s in r['steps'])}, digest {r['digest'][:23]}...")
PY

port=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['$ns/digits']['http'])" "$state/agent/services.json")
say "A sample inference request through the Service (kube-proxy's job: 127.0.0.1:$port)"
body=$("$py" -c "
from shipyard.runtime import datasets
d = datasets.load_digits(); x = d.eval_inputs[0][0].tolist()
import json; print(json.dumps({'inputs': [{'name': 'input', 'datatype': 'FP32', 'shape': [1, 64], 'data': x}]}))
print(int(d.eval_labels[0]))")
label=$(tail -1 <<<"$body")
answer=$(curl -sS -H 'content-type: application/json' -d "$(head -1 <<<"$body")" "http://127.0.0.1:$port/v2/models/digits/infer")
echo "    $answer" | cut -c1-200
"$py" -c "import json,sys; o=json.loads(sys.argv[1]); d=o['outputs'][0]['data']; print(f'    predicted digit {max(range(10), key=d.__getitem__)} (label {sys.argv[2]}) by version {o[\"model_version\"]}')" "$answer" "$label"

say "Canary update to a good version ($image:1.1.0) under 20 requests/s"
start_load
apply_tag 1.1.0
show '{.status.stableVersion}' 1.1.0 900
sleep 2
stop_load

say "Canary update to a bad version ($image:1.2.0-bad: its runtime fails half of the requests) under load"
start_load
apply_tag 1.2.0-bad
show '{.status.phase}' RolledBack 900
sleep 3
stop_load

say "Rollback to 1.0.0, kept at 0 replicas: started first, traffic moves once it is Ready (under load)"
start_load
kubectl annotate -n $ns md/digits shipyard.dev/rollback-to=1.0.0 >/dev/null
show '{.status.stableVersion}' 1.0.0 300
sleep 2
stop_load
kubectl get events -n $ns --field-selector involvedObject.kind=ModelDeployment,reason=RolledBack \
  -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' | tail -1 | sed 's/^/    /'

say "A model in S3: the same weights in the stack's S3 server (versitygw), served by 4 pods of the runtime image"
echo "    (examples/digits-s3.yaml: each pod's init container runs shipyard-runtime fetch, digest checked, node cache)"
"$py" -m tests.e2e.s3model up --dir "$state/s3" --namespace $ns | kubectl apply -f - >/dev/null
kubectl wait -n $ns --for=condition=Ready --timeout=300s md/digits-s3 >/dev/null || die "digits-s3 was not Ready"
kubectl get md -n $ns digits-s3
kubectl get md -n $ns digits-s3 -o jsonpath='    status.modelFetch: {.status.modelFetch.downloads} download(s), {.status.modelFetch.cacheHits} from the node cache, {.status.modelFetch.bytes} bytes, {.status.modelFetch.digest}{"\n"}'
echo "    what the S3 server's access log counted:"
"$py" -m tests.e2e.s3model downloads --dir "$state/s3" | sed 's/^/    /'
kubectl get events -n $ns --field-selector involvedObject.name=digits-s3,reason=ModelFetched \
  -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' | cut -c1-200 | sed 's/^/    /'

say "Exact canary weights through the Gateway API: Traefik as the Gateway, its pods with addresses in the pod network"
gateway=$(python3 hack/gateway.py start --dir "$state/gateway" --kubeconfig "$KUBECONFIG") || die "Traefik did not start"
gwport=$("$py" -c "import json,sys; print(json.loads(sys.argv[1])['port'])" "$gateway")
echo "    Gateway shipyard-gateway/shipyard (GatewayClass traefik), listener http on 127.0.0.1:$gwport (log: $state/gateway/)"
kubectl create namespace $gns >/dev/null
kubectl label namespace $gns shipyard.dev/pod-network=bridge >/dev/null
echo "    kubectl apply --server-side -n $gns -f examples/digits-gateway.yaml"
kubectl apply --server-side --field-manager=demo -n $gns -f examples/digits-gateway.yaml | sed 's/^/    /'
show_ns=$gns
columns='PHASE:.status.phase,STABLE:.status.stableVersion,CANDIDATE:.status.candidateVersion,STEP:.status.currentStepIndex,WEIGHT:.status.traffic.canaryWeight,PROGRAMMED:.status.traffic.programmed'
show '{.status.phase}' Healthy 300
kubectl get endpointslices -n $gns -l kubernetes.io/service-name=digits \
  -o jsonpath='    EndpointSlice of Service digits: {.items[*].endpoints[*].addresses[0]}{"\n"}'
traffic_line() {  # the plugin's view of the split (kubectl shipyard status), and the route's rules, one line each
  "$venv/bin/kubectl-shipyard" status -n $gns digits | grep -E '^(Stable|Candidate|Traffic):' | sed 's/^/    /'
  "$py" - "$(kubectl get httproute -n $gns digits -o json)" <<'PY'
import json, sys
for rule in json.loads(sys.argv[1])["spec"]["rules"]:
    match = (rule.get("matches") or [{}])[0]
    what = " ".join([match.get("path", {}).get("value", "/")]
                    + [f"+ header {h['name']}: {h['value']}" for h in match.get("headers", [])])
    to = ", ".join(f"{b['name']} {b.get('weight', 1)}" for b in rule["backendRefs"])
    print(f"    HTTPRoute rule {rule.get('name', '-')}: {what} -> {to}")
PY
}
count() {  # $1 requests through the gateway, answers counted per version (more args: loadgen's)
  "$py" -m tests.e2e.loadgen --port "$gwport" --rate 250 --requests "$@" | sed 's/^/    /'
}

say "Canary 1.1.0 at 5% (for a minute): one candidate pod next to the 4 stable ones, and exactly 5% of the requests"
echo "    kubectl patch -n $gns md/digits --type merge -p '{\"spec\":{\"image\":\"$image:1.1.0\"}}'"
kubectl patch -n $gns md/digits --type merge -p "{\"spec\":{\"image\":\"$image:1.1.0\"}}" >/dev/null
show '{.status.traffic.canaryWeight}/{.status.traffic.programmed}' 5/true 300
traffic_line
echo "    2000 requests through the gateway (127.0.0.1:$gwport, 250/s):"
count 2000
echo "    200 requests with the preview header x-shipyard-version: 1.1.0:"
count 200 --header 'x-shipyard-version: 1.1.0'
[ "$(kubectl get md -n $gns digits -o jsonpath='{.status.traffic.canaryWeight}')" = 5 ] \
  || echo "    (the 1-minute step ended while counting: some of these requests went at 50%)"

say "The 50% step (manual: held until promoted): two candidate pods, two stable ones, half the requests each"
show '{.status.traffic.canaryWeight}/{.status.traffic.programmed}/{.status.pausedReason}' 50/true/ManualStep 300
traffic_line
echo "    2000 requests through the gateway:"
count 2000

say "Promoted (kubectl annotate md/digits shipyard.dev/promote=1.1.0): 1.1.0 is the stable, the route back to the model's Service alone"
kubectl annotate -n $gns md/digits shipyard.dev/promote=1.1.0 --overwrite >/dev/null
show '{.status.phase}/{.status.stableVersion}' Healthy/1.1.0 300
echo "    kubectl get httproute -n $gns digits -o yaml   # its spec:"
kubectl get httproute -n $gns digits -o yaml | sed -n '/^spec:/,/^status:/p' | sed '$d' | sed 's/^/    /'
sleep 5  # Traefik applies a route change after its 2 s reload throttle (the old pods answer meanwhile)
echo "    200 requests through the gateway:"
count 200

say "Where it ended"
kubectl get md -n $ns
kubectl get md -n $gns
kubectl get deployments -n $ns -L shipyard.dev/version
say "History"
kubectl get md -n $ns digits -o jsonpath='{range .status.history[*]}{.version}{"\t"}{.outcome}{"\t"}{.reason}{"\t"}{.time}{"\n"}{end}' | sed 's/^/    /'
say "Events"
kubectl get events -n $ns --field-selector involvedObject.kind=ModelDeployment --sort-by=.lastTimestamp | sed 's/^/    /'

say "Done in $(( $(date +%s) - started )) s. To look around yourself, run KEEP=1 make demo, then:"
hint() { printf '  %-64s # %s\n' "$1" "$2"; }
hint "eval \"\$(python3 hack/cluster.py env --dir $state/cluster)\"" "KUBECONFIG and the kubectl of its version"
hint "kubectl get md -n $ns -w" "phase, stable, candidate, step"
hint "kubectl describe md -n $ns digits" "conditions, analysis, history, events"
hint ".venv/bin/kubectl-shipyard dashboard -n $ns" "the rollout dashboard: open the URL it prints"
hint "kubectl get pods -n $ns -o wide" "real processes on node local-0 (pod IPs 127.0.10.x)"
hint "cat $state/agent/services.json" "the Service's local port PORT; then e.g."
hint ".venv/bin/python -m tests.e2e.loadgen --port PORT --seconds 30" "20 requests/s, answers counted per version"
hint "ls $state/agent/logs/" "each container's output"
hint "kubectl apply -n $ns -f examples/digits-blue-green.yaml" "the same model blue-green: preview, promote, a rollback window"
hint "kubectl apply -n $ns -f examples/torchserve.yaml" "the digits model on TorchServe, same canary and rollback"
hint "kubectl get md -n $ns digits-s3 -o yaml" "the model from S3: spec.model, status.modelFetch"
hint "kubectl apply -n $ns -f examples/recommender.yaml" "the recommender example (its own compression Job)"
hint ".venv/bin/kubectl-shipyard status -n $gns digits" "the Gateway API model: Traffic, weights, preview header"
hint "kubectl get httproute -n $gns digits -o yaml" "the route whose weights Shipyard sets (docs/traffic.md)"
hint ".venv/bin/python -m tests.e2e.loadgen --port $gwport --requests 2000 --rate 250" "through the gateway, per version"
echo "  # requests per version and status code in Prometheus:"
echo "  $prometheus/graph?g0.expr=sum%20by%20(version,code)(rate(shipyard_requests_total[1m]))"
