"""The node agent as a kubelet, on a real control plane (hack/node_agent.py; its pure parts are in
tests/unit/test_node_agent.py): what it reports for a pod whose image is not in the catalogue, for a volume it
cannot provide and for containers that finish; that a CPU limit really holds (a busy loop under 500m uses about half
a core, next to one under a limit it cannot reach, and sees its limit where the runtime reads it); that pods reach
Services by name at the Service's port, and see Services come and go while they run; that init containers run in
order before the containers, are restarted with back-off when they fail (or fail the pod under restartPolicy Never)
and are stopped when their pod is deleted; that containers get env from Secrets and ConfigMaps (envFrom,
secretKeyRef, configMapKeyRef) without the agent logging a Secret's value, and wait with CreateContainerConfigError
until a missing Secret or key appears; that two pods share a hostPath DirectoryOrCreate at once; that it refuses to
start where it cannot enforce CPU limits, which is what fails the e2e and harness fixtures there; that, with
--pod-network, a pod of a labelled namespace gets an address of the pod network answering the host, which
kube-controller-manager's EndpointSlice lists ready and drops on deletion, reaches Services by name there and not the
host's loopback, while an unlabelled namespace's pod stays on loopback, and that an agent sweeps a stale namespace of
its work directory and leaves nothing of its pod network when it stops; and that configMap volumes follow their
objects while the pod runs."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.harness.conftest import POD_IP_PREFIX, SERVICE_IP_PREFIX, Node
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.harness, pytest.mark.timeout(600)]

DIGITS = "registry.example/shipyard/digits-model"
LIMITED_MAX_CORES = 0.65  # 500m, with room for the CFS period's rounding; no limit would be ~1.0
BUSY_SECONDS = 4.0
REFERENCE_MIN_CORES = 0.8  # the loop under a limit it cannot reach: ~1.0
REFERENCE_ATTEMPTS = 3


def _pod(name: str, image: str, command: list[str], restart: str = "Never") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": image, "command": command,
                                     "terminationMessagePolicy": "FallbackToLogsOnError"}]}}


def _container_state(node: Node, namespace: str, name: str) -> dict[str, Any] | None:
    pod = node.cluster.get("pod", name, namespace)
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else None


def _namespace(node: Node, namespace: str) -> str:
    if node.cluster.get("namespace", namespace) is None:
        node.cluster.kubectl("create", "namespace", namespace)
    return namespace


def _terminated(node: Node, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    status = wait_until(lambda: (s := _container_state(node, namespace, name)) and "terminated" in s["state"] and s,
                        timeout=timeout, message=f"pod {name} to finish")
    terminated: dict[str, Any] = status["state"]["terminated"]
    return terminated


def test_unknown_image_stays_pending_with_err_image_pull(node: Node) -> None:
    namespace = _namespace(node, "agent-pull")
    node.cluster.apply(_pod("nope", "registry.example/not-there:1.0", ["true"]), namespace)
    status = wait_until(lambda: (s := _container_state(node, namespace, "nope")) and "waiting" in s["state"]
                        and s["state"]["waiting"].get("reason") == "ErrImagePull" and s,
                        timeout=60, message="ErrImagePull")
    pod = node.cluster.get("pod", "nope", namespace)
    assert pod is not None and pod["status"]["phase"] == "Pending" and pod["spec"]["nodeName"] == "local-0"
    assert "not in the local image catalogue" in status["state"]["waiting"]["message"]
    started = time.monotonic()
    node.cluster.kubectl("delete", "namespace", namespace, "--timeout=60s")
    assert time.monotonic() - started < 60


def test_unsupported_volume_fails_the_pod_with_a_message(node: Node) -> None:
    namespace = _namespace(node, "agent-volume")
    pod = _pod("token", f"{DIGITS}:1.0.0", ["true"])
    pod["spec"]["automountServiceAccountToken"] = True  # a projected service account token volume
    node.cluster.apply(pod, namespace)
    status = wait_until(lambda: (s := _container_state(node, namespace, "token")) and "waiting" in s["state"]
                        and s["state"]["waiting"].get("reason") == "CreateContainerConfigError" and s,
                        timeout=60, message="CreateContainerConfigError")
    assert "not supported by the local node agent" in status["state"]["waiting"]["message"]


@pytest.mark.parametrize(("name", "script", "exit_code", "message"), [
    pytest.param("writes-message", "echo done > /dev/termination-log; exit 0", 0, "done", id="termination-log"),
    pytest.param("fails-with-logs", "echo boom-in-logs; exit 3", 3, "boom-in-logs", id="fallback-to-logs"),
])
def test_finished_container_reports_exit_code_and_message(node: Node, name: str, script: str, exit_code: int,
                                                          message: str) -> None:
    namespace = _namespace(node, "agent-exit")
    node.cluster.apply(_pod(name, f"{DIGITS}:1.0.0", ["sh", "-c", script]), namespace)
    terminated = _terminated(node, namespace, name)
    assert terminated["exitCode"] == exit_code and message in terminated.get("message", ""), json.dumps(terminated)
    phase = "Succeeded" if exit_code == 0 else "Failed"
    wait_until(lambda: (node.cluster.get("pod", name, namespace) or {}).get("status", {}).get("phase") == phase,
               timeout=30, message=f"phase {phase}")


# A busy loop that reports the cores it used (its own CPU time over wall time, measured around the loop only), what
# it sees of its CPU limit at the paths the runtime reads (shipyard.runtime.engine.fetch_cpu_limit), and how often
# its cgroup's quota held it back (cpu.stat's nr_throttled, v1 or v2).
BUSY_LOOP = textwrap.dedent(f"""
    import json, time
    def read(path):
        try:
            return open(path).read().strip()
        except OSError:
            return None
    cpu, wall = time.process_time(), time.monotonic()
    while time.monotonic() - wall < {BUSY_SECONDS}:
        pass
    cores = (time.process_time() - cpu) / (time.monotonic() - wall)
    names = ("cpu.max", "cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")
    seen = {{name: read("/sys/fs/cgroup/" + name) for name in names}}
    stat = read("/sys/fs/cgroup/cpu.stat") or read("/sys/fs/cgroup/cpu/cpu.stat") or ""
    throttled = dict(line.split() for line in stat.splitlines()).get("nr_throttled")
    report = {{"cores": cores, "seen": seen, "throttled": None if throttled is None else int(throttled)}}
    open("/dev/termination-log", "w").write(json.dumps(report))
""")


@contextlib.contextmanager
def _outweighing_the_machine(cpu_limits: dict[str, Any]) -> Iterator[None]:
    """While the loops run, the agent's cgroup (both pods' parent) gets the largest CPU weight, so that the other
    processes of a shared machine do not decide what the loops get: each gets what its quota allows (restored
    after)."""
    weight = Path(cpu_limits["mount"]) / cpu_limits["cgroup"] / ("cpu.shares" if cpu_limits["version"] == 1
                                                                  else "cpu.weight")
    before = weight.read_text().strip()
    weight.write_text("262144" if cpu_limits["version"] == 1 else "10000")
    try:
        yield
    finally:
        weight.write_text(before)


def _busy_loops(node: Node, namespace: str, attempt: int) -> dict[str, dict[str, Any]]:
    """Runs the busy loop in two pods side by side, under ``limits.cpu`` 500m and 2 (which one thread cannot
    reach: the reference); their reports."""
    for name, cpu in (("limited", "500m"), ("reference", "2")):
        pod = _pod(f"{name}-{attempt}", f"{DIGITS}:1.0.0", ["python3", "-c", BUSY_LOOP])
        pod["spec"]["containers"][0]["resources"] = {"limits": {"cpu": cpu}}
        node.cluster.apply(pod, namespace)
    reports = {}
    for name in ("limited", "reference"):
        terminated = _terminated(node, namespace, f"{name}-{attempt}")
        assert terminated["exitCode"] == 0, terminated
        reports[name] = json.loads(terminated["message"])
    print(f"\nbusy loop for {BUSY_SECONDS:.0f} s, attempt {attempt}: limit 500m {reports['limited']['cores']:.3f} "
          f"cores (throttled {reports['limited']['throttled']} times), limit 2 {reports['reference']['cores']:.3f} "
          f"cores (throttled {reports['reference']['throttled']} times); the 500m one saw "
          f"{reports['limited']['seen']}")
    return reports


def test_a_cpu_limit_holds(node: Node) -> None:
    """A busy loop under ``limits.cpu: 500m`` uses about half a core at most, its cgroup's quota throttled it, and
    it sees a limit that makes the runtime size one thread. The same loop under a limit of 2, beside it, is the
    reference: it uses (nearly) a whole core, so the measurement tells a quota that binds from one that does not (a
    missing 500m limit would show as a core, and never as a throttle). A run where the reference got less than
    REFERENCE_MIN_CORES (a machine too busy for the weight to help) is repeated, REFERENCE_ATTEMPTS times at most."""
    from shipyard.runtime import engine  # the runtime's own reading of a cgroup's limit

    def runtime_threads(seen: dict[str, str | None]) -> int:
        quota, period = seen["cpu/cpu.cfs_quota_us"], seen["cpu/cpu.cfs_period_us"]
        return int(engine.build_cpu_threads(seen["cpu.max"], int(quota) if quota else None,
                                            int(period) if period else None, affinity=16))

    namespace = _namespace(node, "agent-cpu")
    references = []
    with _outweighing_the_machine(node.cpu_limits):
        for attempt in range(1, REFERENCE_ATTEMPTS + 1):
            reports = _busy_loops(node, namespace, attempt)
            assert runtime_threads(reports["limited"]["seen"]) == 1, reports["limited"]
            assert runtime_threads(reports["reference"]["seen"]) == 2, reports["reference"]
            assert reports["limited"]["cores"] <= LIMITED_MAX_CORES, reports  # contention only ever lowers it
            references.append(round(reports["reference"]["cores"], 2))
            if reports["reference"]["cores"] >= REFERENCE_MIN_CORES:
                break
        else:
            pytest.fail(f"the machine was too busy to show a CPU limit: the loop under a limit of 2 got {references} "
                        f"cores (needs {REFERENCE_MIN_CORES} once in {REFERENCE_ATTEMPTS} runs)")
    assert (reports["limited"]["throttled"] or 0) > 0, reports  # a missing limit is never throttled


# A client inside a pod: fetches each URL (retrying while the name does not resolve or nothing answers yet) and
# reports the address each name resolved to and the HTTP status, in its termination message.
FETCH = textwrap.dedent("""
    import json, socket, sys, time, urllib.parse, urllib.request
    report = {}
    for url in sys.argv[1:]:
        host = urllib.parse.urlsplit(url).hostname
        deadline, outcome = time.monotonic() + 30, None
        while outcome is None or (time.monotonic() < deadline and outcome.get("error")):
            try:
                ip = socket.gethostbyname(host)
                with urllib.request.urlopen(url, timeout=5) as response:
                    outcome = {"ip": ip, "status": response.status}
            except OSError as error:
                outcome = {"error": f"{type(error).__name__}: {error}"}
                time.sleep(0.5)
        report[url] = outcome
    open("/dev/termination-log", "w").write(json.dumps(report))
""")

# Waits for a Service created after the pod started to resolve, then for it to stop resolving once deleted: the
# pod's hosts file follows the Services while the pod runs.
FOLLOW = textwrap.dedent("""
    import json, socket, sys, time
    def resolve(name):
        try:
            return socket.gethostbyname(name)
        except OSError:
            return None
    name, seen = sys.argv[1], None
    deadline = time.monotonic() + 120
    while seen is None and time.monotonic() < deadline:
        seen = resolve(name)
        time.sleep(0.2)
    while resolve(name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    open("/dev/termination-log", "w").write(json.dumps({"appeared": seen, "gone": resolve(name) is None}))
""")


def _service(name: str, port: int, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}


def _virtual_ip(node: Node, namespace: str, name: str) -> str | None:
    ip: str | None = json.loads((node.workdir / "service-ips.json").read_text()).get(f"{namespace}/{name}")
    return ip


def _web_server(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod serving HTTP on its own IP, port 8000 (named http), ready once it listens."""
    pod = _pod(name, f"{DIGITS}:1.0.0", ["python3", "-m", "http.server", "8000", "--bind", "$(POD_IP)"],
               restart="Always")
    pod["metadata"]["labels"] = labels
    container = pod["spec"]["containers"][0]
    container["env"] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    container["ports"] = [{"name": "http", "containerPort": 8000}]
    container["readinessProbe"] = {"tcpSocket": {"port": "http"}, "periodSeconds": 1}
    return pod


def test_pods_reach_services_by_name_at_the_service_port(node: Node) -> None:
    """Kube-proxy's and cluster DNS's job: a Service's names resolve inside pods (the short name only in its own
    namespace) to its virtual IP, where it listens on the Service's own port and forwards to a ready pod."""
    namespace, other = _namespace(node, "agent-svc"), _namespace(node, "agent-svc-other")
    node.cluster.apply(_web_server("web", {"app": "web"}), namespace)
    node.cluster.apply(_service("web", 80, {"app": "web"}), namespace)
    vip = wait_until(lambda: _virtual_ip(node, namespace, "web"), timeout=30, message="the Service's virtual IP")
    assert vip.startswith(f"{SERVICE_IP_PREFIX}.")
    qualified = [f"http://web.{namespace}.svc.cluster.local/", f"http://web.{namespace}.svc/",
                 f"http://web.{namespace}/"]
    node.cluster.apply(_pod("same-ns", f"{DIGITS}:1.0.0", ["python3", "-c", FETCH, *qualified, "http://web/"]),
                       namespace)
    node.cluster.apply(_pod("other-ns", f"{DIGITS}:1.0.0", ["python3", "-c", FETCH, qualified[1], "http://web/"]),
                       other)
    same = json.loads(_terminated(node, namespace, "same-ns")["message"])
    assert same == {url: {"ip": vip, "status": 200} for url in [*qualified, "http://web/"]}, same
    elsewhere = json.loads(_terminated(node, other, "other-ns")["message"])
    assert elsewhere[qualified[1]] == {"ip": vip, "status": 200}, elsewhere
    assert "error" in elsewhere["http://web/"], elsewhere  # the short name is the Service's namespace's only
    forwarded = [json.loads(line) for line in (node.workdir / "conntrack.jsonl").read_text().splitlines()]
    assert any(e["service"] == f"{namespace}/web" and e["frontend"] == f"{vip}:80" and e.get("pod") == "web"
               for e in forwarded)


def test_a_running_pod_sees_services_come_and_go(node: Node) -> None:
    namespace = _namespace(node, "agent-svc-late")
    node.cluster.apply(_pod("follower", f"{DIGITS}:1.0.0", ["python3", "-c", FOLLOW, f"late.{namespace}.svc"]),
                       namespace)
    wait_until(lambda: (s := _container_state(node, namespace, "follower")) and "running" in s["state"],
               timeout=60, message="the follower pod to run")
    node.cluster.apply(_service("late", 8080, {"app": "late"}), namespace)
    vip = wait_until(lambda: _virtual_ip(node, namespace, "late"), timeout=30, message="the late Service's virtual IP")
    time.sleep(2)  # the follower polls every 0.2 s
    node.cluster.kubectl("delete", "service", "late", "-n", namespace)
    report = json.loads(_terminated(node, namespace, "follower", timeout=60)["message"])
    assert report == {"appeared": vip, "gone": True}, report


def test_the_agent_refuses_to_start_without_cpu_limits(tmp_path: Path) -> None:
    """What makes the e2e and harness fixtures fail on a machine without a usable cgroup cpu controller: here a
    mount table that lists none. (The agent exits before it reads its kubeconfig.)"""
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")
    log = tmp_path / "agent.log"
    with pytest.raises(AssertionError, match="the node agent exited with 1") as failure:
        stack.start_agent(tmp_path / "no-kubeconfig", tmp_path / "agent", log, "127.0.13", "--mounts-file",
                          str(tmp_path / "mounts"), timeout=60)
    assert "CPU LIMITS ARE NOT ENFORCED" in str(failure.value)
    assert "--require-cpu-limits: refusing to start" in log.read_text()


# ------------------------------------------------------------------------------------------------ init containers


def _init_container(name: str, script: str, mounts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": name, "image": f"{DIGITS}:1.0.0", "command": ["sh", "-c", script],
            "volumeMounts": mounts or [], "terminationMessagePolicy": "FallbackToLogsOnError"}


def _pod_status(node: Node, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = ((node.cluster.get("pod", name, namespace) or {}).get("status")) or {}
    return status


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _kubectl_status(node: Node, namespace: str, name: str) -> str:
    """The STATUS column of ``kubectl get pod`` (the API server's table for pods: Init:0/1, Init:Error, ...)."""
    fields = node.cluster.kubectl("get", "pod", name, "-n", namespace, "--no-headers", check=False).stdout.split()
    return fields[2] if len(fields) > 2 else ""


def _started_in_agent_log(node: Node, namespace: str, name: str, container: str) -> list[int]:
    """The pids the agent started container `container` of the pod as (its "Started container" lines)."""
    prefix = f"Started container {namespace}/{name}/{container} as pid "
    return [int(line.split(prefix, 1)[1].split()[0]) for line in node.agent_log.read_text().splitlines()
            if prefix in line]


def test_init_containers_run_in_order_before_the_containers(node: Node) -> None:
    """Two init containers, one after the other, each to completion: the first (under a CPU limit it sees) writes
    into an emptyDir, the second reads that (through a read-only subPath it cannot write to, as another user) and adds
    to it; the container sees both files."""
    namespace = _namespace(node, "agent-init")
    pod = _pod("ordered", f"{DIGITS}:1.0.0", ["sh", "-c", "cat /work/first/a /work/b > /dev/termination-log"])
    pod["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "work", "mountPath": "/work", "readOnly": True}]
    second = _init_container("second", 'a=$(cat /first/a); if touch /first/x 2>/dev/null; then exit 9; fi; '
                                       'echo "$a then two as $(id -u)" > /work/b; echo second-ran',
                             [{"name": "work", "mountPath": "/work"},
                              {"name": "work", "mountPath": "/first", "subPath": "first", "readOnly": True}])
    second["securityContext"] = {"runAsUser": 10001}
    # The first reports the CPU limit it sees (cgroup v2's cpu.max or v1's quota) in its termination message.
    first = _init_container("first", "sleep 1; mkdir -p /work/first; chmod 777 /work/first; echo one > /work/first/a; "
                                     "limit=$(cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
                                     "2>/dev/null | head -1); echo \"wrote-a $limit\" > /dev/termination-log",
                            [{"name": "work", "mountPath": "/work"}])
    first["resources"] = {"limits": {"cpu": "500m"}}
    pod["spec"]["initContainers"] = [first, second]
    node.cluster.apply(pod, namespace)
    status = wait_until(lambda: (s := _pod_status(node, namespace, "ordered")).get("phase") in ("Succeeded", "Failed")
                        and s, timeout=120, message="the pod to finish")
    assert status["phase"] == "Succeeded", json.dumps(status)
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["message"] == "one\none then two as 10001", terminated
    assert _condition(status, "Initialized")["status"] == "True", status["conditions"]
    inits = status["initContainerStatuses"]
    assert [s["name"] for s in inits] == ["first", "second"], inits
    for s in inits:
        assert s["ready"] is True and s["started"] is False and s["restartCount"] == 0 and s["lastState"] == {}, s
        assert s["state"]["terminated"]["exitCode"] == 0 and s["state"]["terminated"]["reason"] == "Completed", s
        assert s["image"] == f"{DIGITS}:1.0.0" and s["imageID"].startswith(f"{DIGITS}@sha256:"), s
    assert inits[0]["state"]["terminated"]["message"] in ("wrote-a 50000 100000", "wrote-a 50000"), inits[0]
    assert "message" not in inits[1]["state"]["terminated"], inits[1]  # exit 0: no fallback to the logs
    assert inits[1]["state"]["terminated"]["startedAt"] >= inits[0]["state"]["terminated"]["finishedAt"], inits
    assert "second-ran" in (node.workdir / "logs" / f"{namespace}_ordered_second.log").read_text()


def test_a_failing_init_container_backs_off_until_it_succeeds(node: Node, tmp_path: Path) -> None:
    """Under restartPolicy Always the init container that fails (exit 3, its termination message) is restarted with
    the crash back-off, the pod stays Pending and its container never starts; once it succeeds (a file the test
    creates in a hostPath volume), the container starts and the pod becomes Ready."""
    namespace = _namespace(node, "agent-init-retry")
    gate = tmp_path / "gate"
    gate.mkdir()
    pod = _web_server("retried", {"app": "retried"})
    pod["spec"]["volumes"] = [{"name": "gate", "hostPath": {"path": str(gate), "type": "Directory"}}]
    pod["spec"]["initContainers"] = [_init_container(
        "fetch", "if test -f /gate/open; then echo '{\"bytes\": 12}' > /dev/termination-log; exit 0; fi; "
                 "echo 'access denied (403) to s3://b/k' > /dev/termination-log; exit 3",
        [{"name": "gate", "mountPath": "/gate", "readOnly": True}])]
    node.cluster.apply(pod, namespace)
    seen: dict[str, set[Any]] = {"phase": set(), "kubectl": set(), "main": set(), "restarts": set()}

    def backing_off_twice() -> dict[str, Any] | None:
        status = _pod_status(node, namespace, "retried")
        seen["phase"].add(status.get("phase"))
        seen["kubectl"].add(_kubectl_status(node, namespace, "retried"))
        inits = status.get("initContainerStatuses") or []
        if not inits:  # not reported by the agent yet
            return None
        seen["main"].add(json.dumps(status["containerStatuses"][0]["state"]))
        seen["restarts"].add(inits[0]["restartCount"])
        if inits[0]["restartCount"] >= 2 and "waiting" in inits[0]["state"]:
            return status
        return None

    status = wait_until(backing_off_twice, timeout=90, message="the init container to fail twice")
    fetch = status["initContainerStatuses"][0]
    assert fetch["state"]["waiting"]["reason"] == "CrashLoopBackOff", fetch
    assert fetch["ready"] is False and fetch["started"] is False, fetch
    last = fetch["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error", last
    assert last["message"] == "access denied (403) to s3://b/k", last
    assert _condition(status, "Initialized") | {"lastTransitionTime": None} == {
        "type": "Initialized", "status": "False", "reason": "ContainersNotInitialized",
        "message": "containers with incomplete status: [fetch]", "lastProbeTime": None, "lastTransitionTime": None}
    assert seen["phase"] == {"Pending"}, seen
    assert seen["main"] == {json.dumps({"waiting": {"reason": "PodInitializing"}})}, seen
    assert {1, 2} <= seen["restarts"], seen  # counted up, one failure at a time
    assert "Init:CrashLoopBackOff" in seen["kubectl"], seen
    assert not _started_in_agent_log(node, namespace, "retried", "main")
    assert not (node.workdir / "logs" / f"{namespace}_retried_main.log").exists()

    (gate / "open").write_text("")
    wait_until(lambda: _condition(_pod_status(node, namespace, "retried"), "Ready").get("status") == "True",
               timeout=90, message="the pod to become Ready once the init container succeeds")
    status = _pod_status(node, namespace, "retried")
    fetch = status["initContainerStatuses"][0]
    assert status["phase"] == "Running" and _condition(status, "Initialized")["status"] == "True", status
    assert fetch["state"]["terminated"]["exitCode"] == 0 and fetch["state"]["terminated"]["reason"] == "Completed"
    assert fetch["state"]["terminated"]["message"] == '{"bytes": 12}', fetch
    assert fetch["ready"] is True and fetch["restartCount"] >= 2, fetch
    assert fetch["lastState"]["terminated"]["exitCode"] == 3, fetch
    assert status["containerStatuses"][0]["restartCount"] == 0, status["containerStatuses"]
    assert len(_started_in_agent_log(node, namespace, "retried", "main")) == 1
    node.cluster.kubectl("delete", "pod", "retried", "-n", namespace, "--timeout=60s")


def test_a_failing_init_container_fails_the_pod_under_restart_policy_never(node: Node) -> None:
    namespace = _namespace(node, "agent-init-never")
    pod = _pod("once", f"{DIGITS}:1.0.0", ["true"])
    pod["spec"]["initContainers"] = [_init_container("fetch", "echo 'access denied (403) to s3://b/k'; exit 3")]
    node.cluster.apply(pod, namespace)
    status = wait_until(lambda: (s := _pod_status(node, namespace, "once")).get("phase") == "Failed" and s,
                        timeout=60, message="the pod to fail")
    fetch = status["initContainerStatuses"][0]
    terminated = fetch["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error", fetch
    assert terminated["message"].splitlines()[-1] == "access denied (403) to s3://b/k", fetch  # from the logs
    assert fetch["restartCount"] == 0 and fetch["ready"] is False, fetch
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}, status
    assert _condition(status, "Initialized")["status"] == "False", status["conditions"]
    assert _kubectl_status(node, namespace, "once") == "Init:Error"
    time.sleep(2)  # no restart, no container
    assert _pod_status(node, namespace, "once")["initContainerStatuses"][0]["restartCount"] == 0
    assert not _started_in_agent_log(node, namespace, "once", "main")


def test_deleting_a_pod_stops_its_init_container(node: Node) -> None:
    """An init container that ignores SIGTERM is killed at the end of the pod's grace period (2 s); the container
    after it never starts."""
    namespace = _namespace(node, "agent-init-delete")
    pod = _pod("deleted", f"{DIGITS}:1.0.0", ["true"])
    pod["spec"]["initContainers"] = [
        _init_container("hold", "trap '' TERM; echo holding; while true; do sleep 1; done")]
    node.cluster.apply(pod, namespace)
    log = node.workdir / "logs" / f"{namespace}_deleted_hold.log"
    wait_until(lambda: log.exists() and "holding" in log.read_text(), timeout=60, message="the init container")
    status = _pod_status(node, namespace, "deleted")
    assert "running" in status["initContainerStatuses"][0]["state"] and status["phase"] == "Pending", status
    assert status["initContainerStatuses"][0]["started"] is True, status
    assert _kubectl_status(node, namespace, "deleted") == "Init:0/1"
    [pid] = _started_in_agent_log(node, namespace, "deleted", "hold")
    started = time.monotonic()
    node.cluster.kubectl("delete", "pod", "deleted", "-n", namespace, "--wait=true", "--timeout=60s")
    took = time.monotonic() - started
    assert 1.5 <= took < 12, f"the pod was gone {took:.1f} s after its deletion (grace period 2 s)"
    assert not stack.proc.alive(pid)
    assert f"Killed container {namespace}/deleted/hold after its grace period" in node.agent_log.read_text()
    assert not _started_in_agent_log(node, namespace, "deleted", "main")
    assert not (node.workdir / "logs" / f"{namespace}_deleted_main.log").exists()


# ------------------------------------------------------------------------------------------ env from Secrets


def _secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def _key_ref(kind: str, name: str, key: str) -> dict[str, Any]:
    return {"valueFrom": {kind: {"name": name, "key": key}}}


def _events(node: Node, namespace: str, pod: str) -> list[dict[str, Any]]:
    items = json.loads(node.cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return [e for e in items if e["involvedObject"]["name"] == pod]


def test_containers_get_env_from_secrets_and_configmaps(node: Node) -> None:
    """An init container takes a Secret's keys with envFrom (and a ConfigMap's with a prefix), as Shipyard passes
    model-storage credentials; the container takes one key with secretKeyRef, one with configMapKeyRef, expands them
    into a later value and into its args. Each reports what it saw; the Secret's value appears in neither the agent's
    log nor the container's (the command is logged as written)."""
    namespace = _namespace(node, "agent-env")
    secret_value = f"sv-{uuid.uuid4().hex}"
    node.cluster.apply(_secret("model-storage", AWS_ACCESS_KEY_ID="AKIA-harness", AWS_SECRET_ACCESS_KEY=secret_value),
                       namespace)
    node.cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                        "data": {"REGION": "eu-west-1"}}, namespace)
    pod = _pod("creds", f"{DIGITS}:1.0.0", ["sh", "-c", 'printf "%s|%s|%s" "$KEY" "$URL" "$1" > /dev/termination-log',
                                           "sh", "$(KEY)"])
    pod["spec"]["containers"][0]["env"] = [
        {"name": "KEY", **_key_ref("secretKeyRef", "model-storage", "AWS_SECRET_ACCESS_KEY")},
        {"name": "REGION", **_key_ref("configMapKeyRef", "settings", "REGION")},
        {"name": "URL", "value": "s3://models-$(REGION)/digits"}]
    fetch = _init_container("fetch", 'printf "%s|%s|%s" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" "$S_REGION" '
                                     "> /dev/termination-log")
    fetch["envFrom"] = [{"secretRef": {"name": "model-storage"}}, {"configMapRef": {"name": "settings"},
                                                                     "prefix": "S_"}]
    pod["spec"]["initContainers"] = [fetch]
    node.cluster.apply(pod, namespace)
    status = wait_until(lambda: (s := _pod_status(node, namespace, "creds")).get("phase") in ("Succeeded", "Failed")
                        and s, timeout=120, message="the pod to finish")
    assert status["phase"] == "Succeeded", json.dumps(status)
    init = status["initContainerStatuses"][0]["state"]["terminated"]
    assert init["message"] == f"AKIA-harness|{secret_value}|eu-west-1", init
    main = status["containerStatuses"][0]["state"]["terminated"]
    assert main["message"] == f"{secret_value}|s3://models-eu-west-1/digits|{secret_value}", main
    assert secret_value not in node.agent_log.read_text()
    for container in ("fetch", "main"):
        assert secret_value not in (node.workdir / "logs" / f"{namespace}_creds_{container}.log").read_text()
    assert "$(KEY)" in (node.workdir / "logs" / f"{namespace}_creds_main.log").read_text()  # as written


def test_a_container_waits_for_its_secret_until_it_is_created(node: Node) -> None:
    """As a kubelet: an init container whose envFrom Secret does not exist waits with CreateContainerConfigError (the
    kubelet's message, a Failed event) and the pod stays Pending; once the Secret is created it runs, and the
    container, whose secretKeyRef names a key the Secret lacks, waits in turn until the key is added; then it runs."""
    namespace = _namespace(node, "agent-env-late")
    pod = _pod("late", f"{DIGITS}:1.0.0", ["sh", "-c", 'printf %s "$TOKEN" > /dev/termination-log'])
    pod["spec"]["containers"][0]["env"] = [{"name": "TOKEN", **_key_ref("secretKeyRef", "late-creds", "token")}]
    fetch = _init_container("fetch", 'test -n "$AWS_ACCESS_KEY_ID"')
    fetch["envFrom"] = [{"secretRef": {"name": "late-creds"}}]
    pod["spec"]["initContainers"] = [fetch]
    node.cluster.apply(pod, namespace)

    def waiting(statuses: str, message: str) -> Any:
        def check() -> Any:
            status = _pod_status(node, namespace, "late")
            state = ((status.get(statuses) or [{}])[0].get("state") or {}).get("waiting") or {}
            return state.get("reason") == "CreateContainerConfigError" and state.get("message") == message and status
        return check

    status = wait_until(waiting("initContainerStatuses", 'secret "late-creds" not found'), timeout=60,
                        message="the init container to wait for its Secret")
    assert status["phase"] == "Pending", status
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}, status
    assert _kubectl_status(node, namespace, "late") == "Init:CreateContainerConfigError"
    wait_until(lambda: any(e["reason"] == "Failed" and e["type"] == "Warning"
                           and e["message"] == 'Error: secret "late-creds" not found'
                           for e in _events(node, namespace, "late")), timeout=30, message="the Failed event")
    time.sleep(3)  # tried again (every 2 s), still waiting, nothing started
    assert waiting("initContainerStatuses", 'secret "late-creds" not found')()
    assert not _started_in_agent_log(node, namespace, "late", "fetch")

    node.cluster.apply(_secret("late-creds", AWS_ACCESS_KEY_ID="AKIA-late"), namespace)
    status = wait_until(waiting("containerStatuses", f"couldn't find key token in Secret {namespace}/late-creds"),
                        timeout=60, message="the init container to run and the container to wait for its key")
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0, status
    assert _kubectl_status(node, namespace, "late") == "CreateContainerConfigError"

    node.cluster.apply(_secret("late-creds", AWS_ACCESS_KEY_ID="AKIA-late", token="t0ken"), namespace)
    terminated = _terminated(node, namespace, "late", timeout=60)
    assert terminated["exitCode"] == 0 and terminated["message"] == "t0ken", terminated
    assert len(_started_in_agent_log(node, namespace, "late", "main")) == 1


# ------------------------------------------------------------------------------------------------ hostPath


def test_a_host_path_directory_or_create_is_shared_by_two_pods_at_once(node: Node, tmp_path: Path) -> None:
    """A node-level cache as the operator mounts it: two pods at once on a hostPath of type DirectoryOrCreate that
    does not exist yet (nor its parent). The agent creates it; each pod writes its file and waits for the other's, so
    both succeed only if they share the one directory while both run; the files are on the node after."""
    namespace = _namespace(node, "agent-hostpath")
    cache = tmp_path / "node-cache" / "models"
    for name, other in (("cache-a", "cache-b"), ("cache-b", "cache-a")):
        pod = _pod(name, f"{DIGITS}:1.0.0", [
            "sh", "-c", f"echo {name} > /cache/{name}; for i in $(seq 300); do if test -f /cache/{other}; then "
                        "ls /cache | tr '\\n' ' ' > /dev/termination-log; exit 0; fi; sleep 0.1; done; exit 1"])
        pod["spec"]["volumes"] = [{"name": "cache", "hostPath": {"path": str(cache), "type": "DirectoryOrCreate"}}]
        pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "cache", "mountPath": "/cache"}]
        node.cluster.apply(pod, namespace)
    for name in ("cache-a", "cache-b"):
        terminated = _terminated(node, namespace, name, timeout=90)
        assert terminated["exitCode"] == 0 and terminated["message"] == "cache-a cache-b", terminated
    assert sorted(p.name for p in cache.iterdir()) == ["cache-a", "cache-b"]
    assert (cache / "cache-a").read_text() == "cache-a\n"


# ------------------------------------------------------------------------------------------------ pod network


def _labelled_namespace(node: Node, namespace: str) -> str:
    """A namespace whose pods the agent puts in its pod network (label shipyard.dev/pod-network=bridge)."""
    _namespace(node, namespace)
    node.cluster.kubectl("label", "namespace", namespace, "shipyard.dev/pod-network=bridge", "--overwrite")
    return namespace


def _ready_ip(node: Node, namespace: str, name: str) -> str:
    """The pod IP once the pod is Ready."""
    status = wait_until(lambda: (s := _pod_status(node, namespace, name)) and s.get("podIP")
                        and _condition(s, "Ready").get("status") == "True" and s, timeout=90,
                        message=f"pod {namespace}/{name} to become Ready")
    assert status["podIPs"] == [{"ip": status["podIP"]}], status
    ip: str = status["podIP"]
    return ip


def _slice_endpoints(node: Node, namespace: str, service: str) -> list[dict[str, Any]]:
    """The endpoints of the Service's EndpointSlices (what kube-controller-manager wrote)."""
    items = json.loads(node.cluster.kubectl("get", "endpointslices", "-n", namespace, "-l",
                                            f"kubernetes.io/service-name={service}", "-o", "json").stdout)["items"]
    return [e for s in items for e in s.get("endpoints") or []]


def _netns_names() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


def test_a_pod_in_a_labelled_namespace_gets_an_address_in_the_pod_network(node: Node) -> None:
    """A pod of a namespace labelled shipyard.dev/pod-network=bridge gets its own network namespace and an address of
    the pod network, where it answers the host; kube-controller-manager's EndpointSlice controller publishes that
    address, ready, for a Service selecting it, and drops it when the pod is deleted, whose network namespace and
    veth go with it. A pod of an unlabelled namespace keeps a loopback address."""
    network = ipaddress.ip_network(node.pod_network["cidr"])
    namespace, plain = _labelled_namespace(node, "agent-net"), _namespace(node, "agent-net-plain")
    node.cluster.apply(_web_server("web", {"app": "web"}), namespace)
    node.cluster.apply(_service("web", 80, {"app": "web"}), namespace)
    node.cluster.apply(_web_server("web", {"app": "web"}), plain)
    ip = _ready_ip(node, namespace, "web")
    assert ipaddress.ip_address(ip) in network and ip != node.pod_network["hostAddress"], ip
    assert _ready_ip(node, plain, "web").startswith(f"{POD_IP_PREFIX}."), "an unlabelled namespace's pod"
    assert _http_status(f"http://{ip}:8000/") == 200  # from the host, through the veth to the stack's bridge
    uid = node.cluster.get("pod", "web", namespace)["metadata"]["uid"]  # type: ignore[index]
    pod_netns = f"{node.pod_network['netns']}-{uid.replace('-', '')[:12]}"
    assert pod_netns in _netns_names()

    endpoints = wait_until(lambda: _slice_endpoints(node, namespace, "web"), timeout=30,
                           message="kube-controller-manager's EndpointSlice for the Service")
    assert [(e["addresses"], e["conditions"]["ready"], e["targetRef"]["name"], e["nodeName"]) for e in endpoints] == [
        ([ip], True, "web", "local-0")], endpoints
    node.cluster.kubectl("delete", "pod", "web", "-n", namespace, "--wait=false")
    wait_until(lambda: not any(e["addresses"] == [ip] and e["conditions"]["ready"]
                               for e in _slice_endpoints(node, namespace, "web")), timeout=30,
               message="the deleted pod's address to leave the EndpointSlice (or turn not ready)")
    wait_until(lambda: node.cluster.get("pod", "web", namespace) is None, timeout=60, message="the pod to be gone")
    wait_until(lambda: not _slice_endpoints(node, namespace, "web"), timeout=30,
               message="the EndpointSlice without the pod")
    assert pod_netns not in _netns_names()
    links = subprocess.run(["ip", "-n", node.pod_network["netns"], "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert f"p{uid.replace('-', '')[:12]}" not in links, links  # the pod's veth went with it


def test_pods_in_the_pod_network_reach_services_by_name(node: Node) -> None:
    """A pod in the pod network reaches a Service of another pod there by its names, at the Service's virtual IP of
    the pod network (proxied as the loopback ones: a conntrack record), and a Service of an unlabelled namespace's
    pod too; the host's loopback services are not reachable from its network namespace (the documented limit)."""
    namespace, plain = _labelled_namespace(node, "agent-net-svc"), _namespace(node, "agent-net-svc-plain")
    for ns in (namespace, plain):
        node.cluster.apply(_web_server("web", {"app": "web"}), ns)
        node.cluster.apply(_service("web", 80, {"app": "web"}), ns)
    server_ip = _ready_ip(node, namespace, "web")
    _ready_ip(node, plain, "web")
    vips = wait_until(lambda: (v := json.loads((node.workdir / "pod-network-service-ips.json").read_text()))
                      and f"{namespace}/web" in v and f"{plain}/web" in v and v, timeout=30,
                      message="the Services' virtual IPs in the pod network")
    network = ipaddress.ip_network(node.pod_network["cidr"])
    assert all(ipaddress.ip_address(v) in network for v in vips.values()), vips
    local_port = json.loads((node.workdir / "services.json").read_text())[f"{plain}/web"]["http"]
    urls = ["http://web/", f"http://web.{namespace}.svc.cluster.local/", f"http://web.{plain}.svc/"]
    node.cluster.apply(_pod("client", f"{DIGITS}:1.0.0", ["python3", "-c", FETCH, *urls]), namespace)
    node.cluster.apply(_pod("loopback", f"{DIGITS}:1.0.0", ["python3", "-c", FETCH.replace(
        "time.monotonic() + 30", "time.monotonic() + 2"), f"http://127.0.0.1:{local_port}/"]), namespace)
    report = json.loads(_terminated(node, namespace, "client")["message"])
    assert report == {urls[0]: {"ip": vips[f"{namespace}/web"], "status": 200},
                      urls[1]: {"ip": vips[f"{namespace}/web"], "status": 200},
                      urls[2]: {"ip": vips[f"{plain}/web"], "status": 200}}, report
    client_ip = _pod_status(node, namespace, "client")["podIP"]
    assert ipaddress.ip_address(client_ip) in network and client_ip != server_ip
    forwarded = [json.loads(line) for line in (node.workdir / "conntrack.jsonl").read_text().splitlines()]
    assert any(e["service"] == f"{namespace}/web" and e["frontend"] == f"{vips[f'{namespace}/web']}:80"
               and e.get("endpoint") == f"{server_ip}:8000" and e.get("pod") == "web" for e in forwarded), forwarded
    unreachable = json.loads(_terminated(node, namespace, "loopback")["message"])
    assert "Connection refused" in unreachable[f"http://127.0.0.1:{local_port}/"]["error"], unreachable


def test_the_agent_leaves_nothing_of_its_pod_network(node: Node, tmp_path: Path) -> None:
    """A second agent (Node local-1, a work directory and pod network of its own) finds a stale network namespace of
    its work directory and removes it at start; with a pod of its pod network running, it stops on SIGTERM and
    leaves no network namespace, veth, bridge or policy rule of its own behind."""
    namespace = _labelled_namespace(node, "agent-net-stop")
    workdir = tmp_path / "agent"
    names = stack.load_hack_module("node_agent").build_network_names(workdir.resolve())
    stale = f"{names.netns}-0123456789ab"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    log = tmp_path / "agent.log"
    venv = Path(sys.prefix)
    pod_network: dict[str, str] = {}
    agent = stack.proc.spawn([str(venv / "bin" / "python"), str(stack.REPO / "hack" / "node_agent.py"),
                              "--kubeconfig", node.cluster.kubeconfig, "--workdir", str(workdir), "--venv", str(venv),
                              "--node", "local-1", "--pod-ip-prefix", "127.0.15", "--service-ip-prefix", "127.0.251",
                              "--pod-network", "10.211.0.0/24"], log)
    try:
        wait_until(lambda: (workdir / "agent-ready").exists() or agent.poll() is not None, timeout=120,
                   message="the second agent")
        assert agent.poll() is None, log.read_text()[-3000:]
        pod_network = json.loads((workdir / "agent-ready").read_text())["podNetwork"]
        assert stale not in _netns_names() and pod_network["netns"] in _netns_names()
        assert f"Removed a stale pod network of this work directory: netns {stale}" in log.read_text()
        pod = _web_server("pinned", {"app": "pinned"})
        pod["spec"]["nodeName"] = "local-1"  # past the scheduler: only this agent runs it
        node.cluster.apply(pod, namespace)
        ip = _ready_ip(node, namespace, "pinned")
        assert ip.startswith("10.211.0.") and _http_status(f"http://{ip}:8000/") == 200
        assert len([n for n in _netns_names() if n.startswith(pod_network["netns"])]) == 2  # the stack's, the pod's
    finally:
        code = stack.proc.stop(agent, 60)
        with contextlib.suppress(Exception):
            node.cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert code == 0, log.read_text()[-3000:]
    assert pod_network and stack.pod_network_leftovers(pod_network) == []
    assert not stack.stray_pod_processes(log)
    assert "Removed the pod network 10.211.0.0/24" in log.read_text()


# ------------------------------------------------------------------------------------------ configMap updates


def test_configmap_volumes_follow_their_objects_while_the_pod_runs(node: Node) -> None:
    """As a kubelet syncs them: a ConfigMap changed while the pod runs reaches the file the pod sees within a few
    seconds (the agent refreshes every 3 s), and an optional ConfigMap that did not exist when the pod started is an
    empty directory whose files appear once it is created. The pod serves its /srv over HTTP: what it reads."""
    namespace = _namespace(node, "agent-configmap")

    def config_map(name: str, **data: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}

    node.cluster.apply(config_map("settings", greeting="hello"), namespace)
    pod = _web_server("reader", {"app": "reader"})
    container = pod["spec"]["containers"][0]
    container["command"] += ["--directory", "/srv"]
    pod["spec"]["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}},
                              {"name": "later", "configMap": {"name": "later", "optional": True}}]
    container["volumeMounts"] = [{"name": "settings", "mountPath": "/srv/settings", "readOnly": True},
                                 {"name": "later", "mountPath": "/srv/later", "readOnly": True}]
    node.cluster.apply(pod, namespace)
    ip = _ready_ip(node, namespace, "reader")

    def read(path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{ip}:8000/{path}", timeout=5) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as error:
            assert error.code == 404, error
            return None

    assert read("settings/greeting") == "hello"
    assert read("later/x") is None
    started = time.monotonic()
    node.cluster.apply(config_map("settings", greeting="bye"), namespace)
    wait_until(lambda: read("settings/greeting") == "bye", timeout=15, interval=0.2, message="the updated file")
    updated_s = time.monotonic() - started
    node.cluster.apply(config_map("later", x="appeared"), namespace)
    started = time.monotonic()
    wait_until(lambda: read("later/x") == "appeared", timeout=15, interval=0.2, message="the optional ConfigMap")
    print(f"\nconfigMap update seen after {updated_s:.1f} s, the optional configMap's file after "
          f"{time.monotonic() - started:.1f} s")
    assert updated_s < 10
    node.cluster.kubectl("delete", "pod", "reader", "-n", namespace, "--wait=false")
