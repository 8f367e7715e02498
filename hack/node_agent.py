#!/usr/bin/env python3
"""A local "kubelet" for the e2e tier: runs the pods bound to one node as real processes (does process, file,
mount and network I/O; needs root for mount namespaces).

    .venv/bin/python hack/node_agent.py --kubeconfig K --workdir D [--taint-fake-nodes] [--prepare-images]
        [--pod-network CIDR]

What it does, like a kubelet and kube-proxy on one machine:

- registers Node ``local-0`` (label ``shipyard.dev/node=local``) and keeps it Ready (status heartbeat + Lease);
  with ``--taint-fake-nodes`` it taints the KWOK nodes ``shipyard.dev/fake=true:NoSchedule`` so that ordinary pods
  land here, while pods that tolerate it (e.g. GPU pods) are still faked by KWOK;
- runs every container of every pod bound to the node as a process: its own mount namespace (``unshare -m``)
  where the volumes (emptyDir, configMap, secret, PVC -> its bound PV's hostPath, hostPath, image), the
  termination-message file and the image's contents (the local image catalogue, ``hack/e2e-images.yaml``) are
  bind-mounted at their paths; the user of ``securityContext.runAsUser`` (``setpriv``); a CPU limit as a CFS quota
  in a cgroup (v1 or v2, whichever the machine has: hack/cgroups.py) that the process sees as its own (with
  ``--require-cpu-limits`` the agent refuses to start where it cannot enforce them); the env a kubelet builds
  (``envFrom`` Secrets and ConfigMaps with their prefix, then ``env``: ``value`` with ``$(VAR)`` expansion,
  ``fieldRef``, ``resourceFieldRef``, ``secretKeyRef``, ``configMapKeyRef``; objects read from the API server at each
  start: one missing, or a missing key, not optional, keeps the container waiting with CreateContainerConfigError and
  the kubelet's message, tried again every 2 s until it appears; a command is logged as written, never with a
  Secret's value expanded into it) over the image's ENV; the virtualenv's bin on PATH;
- runs a pod's init containers first, each as a regular container is run (image, command, env, volumes, user, CPU
  limit, termination message, log), one at a time in order, each to completion, once the volumes are ready; the
  regular containers start only after the last exits 0. A failed one is restarted with the crash back-off under
  restartPolicy Always or OnFailure (``CrashLoopBackOff``) and fails the pod under Never; the pod stays Pending
  (``Initialized`` False) until they all completed, and reports them in ``initContainerStatuses``;
- gives each pod its own loopback address 127.0.N.M as pod IP (a ``shipyard-runtime serve`` gets ``--host <pod
  IP>`` appended: the runtime has no environment variable for its bind address); with ``--pod-network CIDR``, a pod
  of a namespace labelled ``shipyard.dev/pod-network=bridge`` gets a network namespace of its own instead (see "Pod
  network" below);
- keeps configMap and secret volumes of running pods up to date as a kubelet does: every 3 s each is read again and
  a changed file is written beside the old one and renamed over it (a reader sees one or the other, whole), a removed
  key's file deleted; an optional one that is missing is an empty directory whose files appear once it is created
  (a file mounted alone with ``subPath`` keeps its first content, as with a kubelet);
- reports pod status as a kubelet does: phase, pod IPs, conditions (Ready from the real readiness probe),
  container states with exit codes and termination messages (FallbackToLogsOnError), restarts with back-off on
  crashes and failed liveness probes; a deleted pod gets SIGTERM, then SIGKILL after its grace period, then its
  object is deleted with grace 0;
- proxies every Service with a selector: a virtual IP of its own (``--service-ip-prefix``, default
  ``127.0.254``: ``<workdir>/service-ips.json``) listening on each Service port, and a listener on 127.0.0.1 per
  Service port (``<workdir>/services.json``: ``ns/name`` -> port name -> local port); each forwards every TCP
  connection to a random Ready, not terminating local pod, and each forwarded connection is recorded in
  ``<workdir>/conntrack.jsonl`` (client port -> pod), as ``conntrack -L`` would show;
- resolves Service names inside pods as cluster DNS would: each pod's /etc/hosts is a file of its own, bound over
  it in its mount namespace and rewritten in place as Services come and go (``name.ns.svc.cluster.local``,
  ``name.ns.svc``, ``name.ns``, and ``name`` in the same namespace -> the virtual IP);
- pulls image volumes (``volumes[].image: {reference, pullPolicy}``, Kubernetes' ImageVolume) from an OCI registry
  with ``shipyard-runtime fetch --uri oci://<reference> --path /`` (this checkout's fetch, run by the venv's Python)
  into the pod's directory, through a node cache (``<workdir>/image-volume-cache``: a tag costs one manifest GET
  once cached, a digest nothing), trusting ``--registry-ca`` and with the credentials of ``--registry-config`` (a
  Docker config file); an artifact's files or an image's whole filesystem, always mounted read-only. A failed pull
  leaves the pod Pending, its containers waiting with ``ErrImagePull`` and then ``ImagePullBackOff`` (the message
  names the reference and fetch's reason), retried with back-off (10 s doubling to 300 s), as a kubelet does.
  ``pullPolicy`` is not told apart: every pull goes through the node cache;
- writes Prometheus file_sd targets of running pods' named ports ``http``/``metrics``
  (``<workdir>/prometheus-targets.json``, labels namespace, pod) and each container's output under
  ``<workdir>/logs/``.

Pod network (``--pod-network CIDR``, a private IPv4 range of /28 or more, e.g. 10.213.0.0/16; absent: every pod on
loopback, as above). At start the agent creates a network namespace of the stack's own, ``shipyard-<8 hex of the
work directory's path>``, with a bridge inside (``sy<hex>b``) and one veth pair from the host (``sy<hex>h``, holding
the CIDR's first address, so the host routes the CIDR over it) to that bridge (``sy<hex>s``). A pod of a namespace
labelled ``shipyard.dev/pod-network=bridge`` (read from the API server when the pod starts) gets a network namespace
``shipyard-<hex>-<12 hex of its uid>`` (lo up, eth0 a veth whose other end ``p<12 hex of its uid>`` is on the bridge)
with the next free address of the CIDR (from the second up; released ones to the back of the queue); its containers
and init containers run in it (``nsenter --net`` before ``unshare -m``); its podIP(s), probes, Prometheus targets and
the proxy use that address. Each Service also gets a second virtual IP from the top of the CIDR, a /32 on the bridge,
listening per port in the stack's namespace (sockets created by a thread that joined it with setns(2)) and
forwarding as the loopback ones do; pods in the pod network resolve Service names to those
(``<workdir>/pod-network-service-ips.json``). No default route anywhere, IPv4 forwarding off in every namespace the
agent creates, IPv6 off on all its interfaces, and a host policy rule (priority 1000) refusing to route anything that
arrives from the pod network and is not for the host itself: a packet only goes between the host and the pods. A
deleted pod's namespace and veth go with it; at exit (and at start, for what an agent with the same work directory
left) the agent removes every namespace, veth, bridge and rule of its pod network. Limits: a pod in the pod network
cannot reach the host's loopback services (the API server, the S3 server, the registry, 127.0.0.1 listeners of the
Service proxy): it reaches other pods, Services by name, and the host at the CIDR's first address only; its
``status.hostIP`` still says 127.0.0.1.

EndpointSlices: kube-controller-manager's EndpointSlice controller publishes the pod network's addresses for a Service
as for any pod (ready from the Ready condition the agent reports; terminating once deleted), which is what a gateway
such as Traefik routes to. The API server rejects loopback addresses in EndpointSlices, so a Service selecting a
loopback pod gets no slice written (the controller logs ``FailedToUpdateEndpointSlices``): a Service meant for a
gateway selects pods of the pod network only. The agent's own proxy never reads them: it balances over its own view
of the pods (the one it reports), updated at once on readiness and deletion.

Traffic goes only to 127.0.0.0/8 or into the pod network. Not supported (the pod fails with a message): sidecar
containers (an init container with ``restartPolicy: Always``), exec probes. Env: no ``fileKeyRef`` (the container
waits with CreateContainerConfigError), no Service link variables (``enableServiceLinks``).
Probes: httpGet, tcpSocket and grpc (grpc.health.v1); preStop hooks: sleep. A container without a command runs its
image's ENTRYPOINT and CMD from the catalogue, as the image's USER when the pod sets no runAsUser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import fnmatch
import fractions
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import lightkube
import yaml
from lightkube import codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.resources.core_v1 import (
    ConfigMap,
    Namespace,
    Node,
    PersistentVolume,
    PersistentVolumeClaim,
    Pod,
    Secret,
    Service,
)
from lightkube.types import PatchType

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import cgroups  # noqa: E402
import proc  # noqa: E402

REPO = HACK.parent
log = logging.getLogger("node-agent")

FIELD_MANAGER = "shipyard-node-agent"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_TAINT = {"key": "shipyard.dev/fake", "value": "true", "effect": "NoSchedule"}
NODE_LABEL = "shipyard.dev/node"
HEARTBEAT_SECONDS = 10
LEASE_SECONDS = 40
SCRAPE_PORT_NAMES = ("http", "metrics")
PORT_ANNOTATION = "shipyard.dev/port"
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0
CONFIG_RETRY_S = 2.0  # a container waiting with CreateContainerConfigError is tried again this often
IMAGE_VOLUME_CACHE = "image-volume-cache"  # under the workdir: fetch's node cache for image volumes
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
AGENTS_DIR = Path("/run/shipyard-node-agents")  # one file per live agent: shared host mountpoints stay while any runs
SERVE_ARGV = ("shipyard-runtime", "serve")
POD_NETWORK_LABEL = "shipyard.dev/pod-network"  # on a Namespace: "bridge" puts its pods in the pod network
POD_NETWORK_BRIDGE = "bridge"
NETNS_DIR = Path("/run/netns")  # where `ip netns` names network namespaces
CLONE_NEWNET = 0x40000000
RULE_PRIORITY = 1000  # the host's policy rule refusing to route what comes from a pod network (after the local table)
VOLUME_REFRESH_S = 3.0  # configMap and secret volumes of running pods are brought up to date this often


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- image catalogue


class ImagePullError(Exception):
    """The image is not in the local catalogue (the kubelet's ErrImagePull)."""


@dataclasses.dataclass(frozen=True)
class Image:
    reference: str
    contents: dict[str, str]  # path inside the pod -> build name
    env: dict[str, str]
    image_id: str
    entrypoint: tuple[str, ...] = ()  # ENTRYPOINT: run when the container sets no command
    cmd: tuple[str, ...] = ()  # CMD: the entrypoint's arguments when the container sets neither command nor args
    user: tuple[int, int] | None = None  # USER uid:gid, when the pod's securityContext sets no runAsUser; None: root


def parse_image(reference: str) -> tuple[str, str]:
    """Repository and tag (``latest`` when absent) of an image reference; a digest counts as the tag."""
    if "@" in reference:
        repo, digest = reference.split("@", 1)
        return repo, digest
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = reference.rsplit(":", 1)
        return repo, tag
    return reference, "latest"


class Catalogue:
    """The local image catalogue (hack/e2e-images.yaml) and the cache of image contents it builds."""

    def __init__(self, path: Path, cache: Path, python: str) -> None:
        document = yaml.safe_load(path.read_text()) or {}
        self.images: dict[str, dict[str, Any]] = {i["repository"]: i for i in document.get("images", [])}
        self.builds: dict[str, dict[str, Any]] = document.get("builds", {})
        self.cache = cache
        self.python = python
        self._locks: dict[str, asyncio.Lock] = {}

    def resolve(self, reference: str) -> Image:
        repo, tag = parse_image(reference)
        entry = self.images.get(repo)
        if entry is None:
            raise ImagePullError(f'Failed to pull image "{reference}": repository {repo} is not in the local image '
                                 f"catalogue (hack/e2e-images.yaml)")
        for rule in entry.get("tags", []):
            if fnmatch.fnmatchcase(tag, str(rule["match"])):
                env = {str(k): str(v) for k, v in (rule.get("env") or {}).items()}
                # The tag's own contents take the place of the repository's at the same path.
                contents = {str(p): str(v["build"]) for p, v in {**(entry.get("contents") or {}),
                                                                 **(rule.get("contents") or {})}.items()}
                entrypoint = tuple(str(a) for a in entry.get("entrypoint") or ())
                cmd = tuple(str(a) for a in entry.get("cmd") or ())
                user = None
                if entry.get("user") is not None:
                    uid, _, gid = str(entry["user"]).partition(":")
                    user = (int(uid), int(gid or uid))
                digest = hashlib.sha256(json.dumps([reference, contents, env, entrypoint, cmd, user],
                                                   sort_keys=True).encode()).hexdigest()
                return Image(reference, contents, env, f"{repo}@sha256:{digest}", entrypoint, cmd, user)
        raise ImagePullError(f'Failed to pull image "{reference}": manifest for tag {tag!r} unknown '
                             f"(no tag pattern of {repo} in the local image catalogue matches)")

    def build_dir(self, name: str) -> Path:
        spec = self.builds[name]
        digest = hashlib.sha256()
        digest.update(json.dumps(spec, sort_keys=True).encode())
        for rel in spec.get("inputs", []):  # a file, or a folder (its Python files, in order)
            path = REPO / rel
            for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
                digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
        return self.cache / f"{name}-{digest.hexdigest()[:12]}"

    async def prepare(self, name: str) -> Path:
        """The directory with a build's contents, built once (a cached 'image layer')."""
        if name not in self.builds:
            raise ImagePullError(f"the local image catalogue has no build {name!r}")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            out = self.build_dir(name)
            if out.is_dir():
                return out
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            argv = [a.replace("{python}", self.python).replace("{out}", str(tmp)) for a in self.builds[name]["command"]]
            started = time.monotonic()
            log.info("Building image contents %s: %s", name, " ".join(argv))
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            proc = await asyncio.create_subprocess_exec(*argv, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT)
            output, _ = await proc.communicate()
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ImagePullError(f"building image contents {name} failed ({proc.returncode}): "
                                     f"{output.decode(errors='replace')[-1500:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
            log.info("Built image contents %s in %.1f s at %s", name, time.monotonic() - started, out)
            return out


# ------------------------------------------------------------------------------------------------ host helpers


class HostMountpoints:
    """Mountpoints created on the host for bind mounts inside pods' mount namespaces; removed at shutdown, when no
    other node agent on this machine still runs (a live agent's pods may use the same paths)."""

    def __init__(self) -> None:
        self.created: list[Path] = []
        AGENTS_DIR.mkdir(parents=True, exist_ok=True)
        self.marker = AGENTS_DIR / str(os.getpid())
        self.marker.write_text("")

    def ensure(self, path: Path, is_file: bool) -> None:
        if path.exists():
            return
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            if p == path and is_file:
                p.touch()
            else:
                p.mkdir()
            self.created.append(p)

    def cleanup(self) -> None:
        self.marker.unlink(missing_ok=True)
        others = [p for p in AGENTS_DIR.iterdir() if p.name.isdigit() and proc.alive(int(p.name))]
        if others:
            log.info("Left %d host mountpoint(s) in place: another node agent runs", len(self.created))
            return
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.unlink() if p.is_file() else p.rmdir()


class IPPool:
    """Pod IPs from 127.<a>.<b>.2-254; released addresses go to the back of the queue (no quick reuse)."""

    def __init__(self, prefix: str) -> None:
        self.free = [f"{prefix}.{i}" for i in range(2, 255)]
        for ip in self.free:
            if not ipaddress.ip_address(ip).is_loopback:
                raise ValueError(f"pod IPs must be loopback addresses, got {ip}")

    def allocate(self, ports: list[int]) -> str:
        for _ in range(len(self.free)):
            ip = self.free.pop(0)
            if all(_port_free(ip, p) for p in ports):
                return ip
            self.free.append(ip)
        raise RuntimeError("no free pod IP")

    def release(self, ip: str) -> None:
        if ip and ip not in self.free:
            self.free.append(ip)


class ServiceIPPool:
    """Virtual IPs of Services (what kube-proxy serves a ClusterIP at, here a loopback address): <prefix>.1-254, one
    per Service for as long as it exists (kept when its ports change); released addresses go to the back of the queue
    (no quick reuse, as for pod IPs). Pure bookkeeping: the proxy tries the addresses `candidates` offers, in order,
    and `assign`s the first it can listen on (another agent on the machine may hold one). With `addresses` instead of
    a prefix: those, in that order (the pod network's Service addresses, ``PodNetworkLayout.service_ips``)."""

    def __init__(self, prefix: str = "", addresses: Sequence[str] = ()) -> None:
        if prefix:
            self.free = [f"{prefix}.{i}" for i in range(1, 255)]
            for ip in self.free:
                if not ipaddress.ip_address(ip).is_loopback:
                    raise ValueError(f"service IPs must be loopback addresses, got {ip}")
        else:
            self.free = list(addresses)
        self.held: dict[str, str] = {}  # "ns/name" -> its virtual IP

    def candidates(self, key: str) -> list[str]:
        """The addresses to try for Service `key`: the one it holds first, then the free ones, oldest released last."""
        held = self.held.get(key)
        return [held, *self.free] if held else list(self.free)

    def assign(self, key: str, ip: str) -> None:
        previous = self.held.get(key)
        if previous == ip:
            return
        if ip not in self.free:
            raise ValueError(f"{ip} is not a free service IP")
        self.free.remove(ip)
        self.held[key] = ip
        if previous:
            self.free.append(previous)

    def release(self, key: str) -> None:
        ip = self.held.pop(key, None)
        if ip:
            self.free.append(ip)


# ------------------------------------------------------------------------------------------------- pod network


@dataclasses.dataclass(frozen=True)
class PodNetworkLayout:
    """How ``--pod-network`` CIDR is used (``plan_pod_network``): the network address unused, the first address the
    host's end of the stack's veth, pods from the second address up, Services' virtual IPs from the last address
    below the broadcast down (at most 254 of them, a quarter of the usable addresses at most)."""

    network: ipaddress.IPv4Network
    host: str  # the host's end of the veth to the stack's bridge
    first_pod: int  # pods' addresses: first_pod..last_pod, as integers
    last_pod: int
    service_ips: tuple[str, ...]  # Services' virtual IPs inside the stack namespace, in the order they are handed out

    def contains(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in self.network


def plan_pod_network(cidr: str) -> PodNetworkLayout:
    """The layout of a pod network CIDR (pure): an IPv4 private range (10/8, 172.16/12, 192.168/16) of at least 16
    addresses (/28), written as its network address; ValueError otherwise."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as error:
        raise ValueError(f"--pod-network {cidr!r}: {error}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"--pod-network {cidr!r}: only IPv4 is supported")
    private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
    if not any(network.subnet_of(p) for p in private):  # type: ignore[arg-type]
        raise ValueError(f"--pod-network {cidr!r}: must lie in a private range (10.0.0.0/8, 172.16.0.0/12, "
                         "192.168.0.0/16)")
    if network.prefixlen > 28:
        raise ValueError(f"--pod-network {cidr!r}: too small (at most /28)")
    base, broadcast = int(network.network_address), int(network.broadcast_address)
    usable = broadcast - base - 1  # without the network and broadcast addresses
    services = min(254, usable // 4)
    service_ips = tuple(str(ipaddress.IPv4Address(broadcast - i)) for i in range(1, services + 1))
    return PodNetworkLayout(network=network, host=str(ipaddress.IPv4Address(base + 1)), first_pod=base + 2,
                            last_pod=broadcast - services - 1, service_ips=service_ips)


class AddressQueue:
    """Pods' addresses in the pod network (pure bookkeeping): handed out in order, a released address to the back of
    the queue (no quick reuse, as the loopback IPPool), each held by one pod at most."""

    def __init__(self, first: int, last: int) -> None:
        self.fresh = first  # the next never-used address
        self.last = last
        self.released: collections.deque[int] = collections.deque()
        self.held: set[int] = set()

    def allocate(self) -> str:
        if self.fresh <= self.last:
            address = self.fresh
            self.fresh += 1
        elif self.released:
            address = self.released.popleft()
        else:
            raise RuntimeError("no free pod IP in the pod network")
        self.held.add(address)
        return str(ipaddress.IPv4Address(address))

    def release(self, ip: str) -> None:
        address = int(ipaddress.IPv4Address(ip))
        if address in self.held:
            self.held.remove(address)
            self.released.append(address)


@dataclasses.dataclass(frozen=True)
class NetworkNames:
    """The names of what the agent creates for its pod network (``build_network_names``): one stack per work
    directory, so two stacks on a machine never share a name."""

    stack_id: str  # 8 hex digits of the work directory's path
    netns: str  # the stack's network namespace: shipyard-<id>
    host_veth: str  # the veth's end on the host (15 characters at most: interface names are IFNAMSIZ-1)
    stack_veth: str  # its other end, inside the stack's namespace, attached to the bridge
    bridge: str  # the bridge inside the stack's namespace

    def pod_netns(self, uid: str) -> str:
        """A pod's network namespace: shipyard-<id>-<12 hex of its uid>."""
        return f"{self.netns}-{uid.replace('-', '')[:12]}"

    def pod_veth(self, uid: str) -> str:
        """The stack's end of a pod's veth (inside the stack's namespace; the pod's end is eth0 in its own)."""
        return f"p{uid.replace('-', '')[:12]}"

    def owns_netns(self, name: str) -> bool:
        """Whether a network namespace is this stack's (its own or one of its pods')."""
        return name == self.netns or name.startswith(f"{self.netns}-")


def build_network_names(workdir: Path) -> NetworkNames:
    """The names for the pod network of the agent with work directory `workdir` (pure: the path as given, resolved
    by the caller)."""
    stack_id = hashlib.sha256(str(workdir).encode()).hexdigest()[:8]
    return NetworkNames(stack_id=stack_id, netns=f"shipyard-{stack_id}", host_veth=f"sy{stack_id}h",
                        stack_veth=f"sy{stack_id}s", bridge=f"sy{stack_id}b")


def build_overlaps(network: ipaddress.IPv4Network, routes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The host's routes (``ip -j -4 route show table all``) whose destination overlaps `network` (pure): a pod
    network there would capture the machine's own traffic. The default route is no overlap."""
    out = []
    for route in routes:
        dst = str(route.get("dst") or "")
        if not dst or dst == "default":
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(dst, strict=False).overlaps(network):
                out.append(f"{dst} dev {route.get('dev', '?')} ({route.get('type', 'unicast')})")
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(path: Path, fn: Callable[[], Any]) -> Any:
    """`fn`'s result, called in the network namespace at `path` (an ``ip netns`` name's file), on a short-lived thread
    of its own that joins it with setns(2) (a network namespace is a thread's: the rest of the process stays where it
    is). A socket created there keeps that namespace, so the event loop serves it from the main thread."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"netns {path.name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def listen_tcp(ip: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket at ip:port (in the calling thread's network namespace)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class PodNetwork:
    """The stack's pod network (``--pod-network``; does network I/O with ``ip``, ``nsenter`` and setns(2)): a network
    namespace of the stack's own with a bridge inside, one veth from the host to that bridge (the host's end holds
    the CIDR's first address, so the host routes the CIDR over it), and per pod a network namespace whose eth0 is a
    veth to the bridge. No default route anywhere, IPv4 forwarding off in every namespace it creates and on the
    host's end of the veth, IPv6 off on all of them: a packet can only go between the host and the pods."""

    def __init__(self, cidr: str, workdir: Path) -> None:
        self.layout = plan_pod_network(cidr)
        self.names = build_network_names(workdir)
        self.addresses = AddressQueue(self.layout.first_pod, self.layout.last_pod)
        self.service_ips = ServiceIPPool(addresses=self.layout.service_ips)
        self.prefixlen = self.layout.network.prefixlen

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.names.netns

    def describe(self) -> dict[str, str]:
        return {"cidr": str(self.layout.network), "netns": self.names.netns, "hostInterface": self.names.host_veth,
                "hostAddress": self.layout.host, "bridge": self.names.bridge}

    # -- commands
    @staticmethod
    async def _run(*argv: str, check: bool = True) -> str:
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        if check and process.returncode != 0:
            reason = err.decode(errors="replace").strip()
            raise RuntimeError(f"{shlex.join(argv)} failed ({process.returncode}): {reason}")
        return out.decode(errors="replace")

    async def _sysctl(self, netns: str, *settings: str) -> None:
        """sysctl -w inside a network namespace (its /proc/sys/net is that namespace's)."""
        await self._run("nsenter", f"--net={NETNS_DIR / netns}", "sysctl", "-q", "-w", *settings)

    async def _netns_names(self) -> list[str]:
        out = await self._run("ip", "-j", "netns", "list", check=False)
        with contextlib.suppress(ValueError):
            return [str(n["name"]) for n in json.loads(out or "[]")]
        return []

    # -- the stack
    async def sweep(self) -> list[str]:
        """Removes whatever a previous agent with this work directory left: its pods' namespaces, the host's veth, the
        stack's namespace. What it removed."""
        removed = []
        names = [n for n in await self._netns_names() if self.names.owns_netns(n)]
        for name in sorted(names, key=lambda n: n == self.names.netns):  # pods' first, the stack's last
            await self._run("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
        if Path(f"/sys/class/net/{self.names.host_veth}").exists():
            await self._run("ip", "link", "del", self.names.host_veth, check=False)
            removed.append(f"link {self.names.host_veth}")
        if await self._delete_rules():
            removed.append(f"rule iif {self.names.host_veth}")
        return removed

    async def _delete_rules(self) -> int:
        """Deletes the host's policy rules for the host's end of the veth; how many there were."""
        count = 0
        while count < 100 and f"iif {self.names.host_veth} " in await self._run("ip", "-4", "rule", "show"):
            await self._run("ip", "rule", "del", "iif", self.names.host_veth, "priority", str(RULE_PRIORITY),
                            check=False)
            count += 1
        return count

    async def setup(self) -> None:
        for tool in ("ip", "nsenter", "sysctl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"--pod-network needs {tool} (apt-get install -y iproute2 util-linux procps)")
        stale = await self.sweep()
        if stale:
            log.info("Removed a stale pod network of this work directory: %s", ", ".join(stale))
        routes = json.loads(await self._run("ip", "-j", "-4", "route", "show", "table", "all") or "[]")
        overlaps = build_overlaps(self.layout.network, routes)
        if overlaps:
            raise RuntimeError(f"--pod-network {self.layout.network} overlaps this machine's routes: "
                               f"{'; '.join(overlaps)}")
        n, ns = self.names, self.names.netns
        await self._run("ip", "netns", "add", ns)
        await self._sysctl(ns, "net.ipv4.ip_forward=0", "net.ipv6.conf.all.disable_ipv6=1",
                           "net.ipv6.conf.default.disable_ipv6=1")
        await self._run("ip", "-n", ns, "link", "set", "lo", "up")
        await self._run("ip", "-n", ns, "link", "add", n.bridge, "type", "bridge")
        await self._run("ip", "link", "add", n.host_veth, "type", "veth", "peer", "name", n.stack_veth, "netns", ns)
        # The host's end: no IPv6, nothing received on it forwarded anywhere, the CIDR routed over it.
        await self._run("sysctl", "-q", "-w", f"net.ipv6.conf.{n.host_veth}.disable_ipv6=1",
                        f"net.ipv4.conf.{n.host_veth}.forwarding=0")
        await self._run("ip", "-n", ns, "link", "set", n.stack_veth, "master", n.bridge, "up")
        await self._run("ip", "-n", ns, "link", "set", n.bridge, "up")
        # Services' virtual IPs are /32 addresses on the bridge; the stack reaches the CIDR over it.
        await self._run("ip", "-n", ns, "route", "add", str(self.layout.network), "dev", n.bridge)
        # Whatever arrives from the pod network and is not for the host itself (the local table's rule comes first)
        # is refused, whatever the host's forwarding settings are or become: a pod that adds a default route of its
        # own still reaches nothing beyond the host.
        await self._run("ip", "rule", "add", "iif", n.host_veth, "priority", str(RULE_PRIORITY), "prohibit")
        await self._run("ip", "addr", "add", f"{self.layout.host}/{self.prefixlen}", "dev", n.host_veth)
        await self._run("ip", "link", "set", n.host_veth, "up")
        log.info("Created the pod network %s: network namespace %s with bridge %s, host interface %s at %s",
                 self.layout.network, ns, n.bridge, n.host_veth, self.layout.host)

    async def teardown(self) -> None:
        """Removes everything the pod network created (best effort: what is already gone is passed over)."""
        n = self.names
        for name in await self._netns_names():
            if name.startswith(f"{n.netns}-"):
                await self._run("ip", "netns", "del", name, check=False)
        await self._run("ip", "link", "del", n.host_veth, check=False)  # and its peer, in the stack's namespace
        await self._delete_rules()
        if self.netns_path.exists():
            await self._run("ip", "-n", n.netns, "link", "del", n.bridge, check=False)
            await self._run("ip", "netns", "del", n.netns, check=False)
        log.info("Removed the pod network %s (network namespace %s)", self.layout.network, n.netns)

    # -- pods
    async def add_pod(self, uid: str) -> tuple[str, str]:
        """A pod's sandbox in the pod network: its own network namespace (lo up), eth0 with the next free address,
        a veth to the stack's bridge. Its namespace's name and address."""
        ip = self.addresses.allocate()
        netns, veth = self.names.pod_netns(uid), self.names.pod_veth(uid)
        try:
            await self._run("ip", "netns", "add", netns)
            await self._sysctl(netns, "net.ipv4.ip_forward=0", "net.ipv6.conf.all.disable_ipv6=1",
                               "net.ipv6.conf.default.disable_ipv6=1")
            await self._run("ip", "-n", netns, "link", "set", "lo", "up")
            await self._run("ip", "-n", self.names.netns, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                            "netns", netns)
            await self._run("ip", "-n", self.names.netns, "link", "set", veth, "master", self.names.bridge, "up")
            await self._run("ip", "-n", netns, "addr", "add", f"{ip}/{self.prefixlen}", "dev", "eth0")
            await self._run("ip", "-n", netns, "link", "set", "eth0", "up")
        except BaseException:
            await self.remove_pod(uid, ip)
            raise
        return netns, ip

    async def remove_pod(self, uid: str, ip: str) -> None:
        await self._run("ip", "-n", self.names.netns, "link", "del", self.names.pod_veth(uid), check=False)
        await self._run("ip", "netns", "del", self.names.pod_netns(uid), check=False)
        self.addresses.release(ip)

    # -- Services
    async def add_service_ip(self, ip: str) -> None:
        await self._run("ip", "-n", self.names.netns, "addr", "replace", f"{ip}/32", "dev", self.names.bridge)

    async def remove_service_ip(self, ip: str) -> None:
        await self._run("ip", "-n", self.names.netns, "addr", "del", f"{ip}/32", "dev", self.names.bridge,
                        check=False)

    def listen(self, ip: str, ports: Sequence[int]) -> list[socket.socket]:
        """Listening sockets at ip:port for each port, created inside the stack's namespace (all or none)."""

        def create() -> list[socket.socket]:
            sockets: list[socket.socket] = []
            try:
                for port in ports:
                    sockets.append(listen_tcp(ip, port))
            except OSError:
                for sock in sockets:
                    sock.close()
                raise
            return sockets

        result: list[socket.socket] = run_in_netns(self.netns_path, create)
        return result


def build_service_hostnames(namespace: str, service_key: str) -> list[str]:
    """The names a pod in `namespace` resolves to the Service `service_key` ("ns/name") with cluster DNS (pure):
    ``name.ns.svc.cluster.local`` and ``name.ns.svc``; ``name.ns`` (the search domain ``svc.cluster.local``); and
    ``name`` alone from the Service's own namespace (the search domain ``<ns>.svc.cluster.local``)."""
    service_ns, name = service_key.split("/", 1)
    names = [f"{name}.{service_ns}.svc.cluster.local", f"{name}.{service_ns}.svc", f"{name}.{service_ns}"]
    return [*names, name] if service_ns == namespace else names


def build_hosts_file(namespace: str, pod: str, pod_ip: str, services: Mapping[str, str], node_hosts: str = "") -> str:
    """A pod's /etc/hosts (pure): localhost and the pod's own name as a kubelet writes them, then each Service
    (``"ns/name"`` -> virtual IP) under the names cluster DNS would answer for it in the pod's namespace, then the
    node's own /etc/hosts (the pods share its network), whose names come after the cluster's as a pod's resolver
    would find them."""
    lines = ["# Kubernetes-managed hosts file (the shipyard node agent's: kubelet's entries, then Services as cluster "
             "DNS would resolve them).", "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if pod_ip:
        lines.append(f"{pod_ip}\t{pod}")
    if services:
        lines.append("# Services: their virtual IPs at the node agent's Service proxy")
        lines += [f"{ip}\t{' '.join(build_service_hostnames(namespace, key))}" for key, ip in sorted(services.items())]
    node_lines = [line for line in node_hosts.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if node_lines:
        lines += ["# The node's /etc/hosts", *node_lines]
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> None:
    """Rewrites a file without replacing it: a bind mount holds the file's inode, so a rename would not reach the
    mount namespaces it is bound into. One write, then the old tail cut (a reader never sees an empty file)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------------- pods


@dataclasses.dataclass
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclasses.dataclass
class ContainerRun:
    spec: dict[str, Any]
    name: str
    image: Image | None = None
    proc: asyncio.subprocess.Process | None = None
    state: dict[str, Any] = dataclasses.field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    container_id: str = ""
    cgroup: Path | None = None
    killing: str = ""  # why the agent is stopping the process (liveness), "" otherwise
    # The Secrets and ConfigMaps its env names, as read before its last start (None: not found; build_container_env)
    env_sources: dict[tuple[str, str], dict[str, Any] | None] = dataclasses.field(default_factory=dict)


class PodWorker:
    """Runs one pod: sandbox (IP, volumes), one supervisor per container, status reporting, termination."""

    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.ns: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.key = f"{self.ns}/{self.name}"
        self.spec: dict[str, Any] = pod["spec"]
        self.dir = agent.workdir / "pods" / self.uid
        self.ip = ""
        self.netns = ""  # the pod's network namespace, when it is in the pod network (else it shares the host's)
        self.start_time = ""
        # A pod with init containers shows every container waiting as PodInitializing until it runs (as a kubelet).
        self.waiting_reason = "PodInitializing" if self.spec.get("initContainers") else "ContainerCreating"
        self.init_containers = [ContainerRun(spec=c, name=c["name"], state={"waiting": {"reason": self.waiting_reason}})
                                for c in self.spec.get("initContainers") or []]
        self.containers = [ContainerRun(spec=c, name=c["name"], state={"waiting": {"reason": self.waiting_reason}})
                           for c in self.spec.get("containers", [])]
        self.terminating = asyncio.Event()
        self.grace_s = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.pod_error = ""  # a reason the pod cannot run at all
        self.image_backoff = BACKOFF_INITIAL_S  # the next wait after a failed image volume pull
        self.transitions: dict[str, tuple[str, str]] = {}
        self._dirty = asyncio.Event()
        self._last_status: str = ""
        self._hosts = ""  # what the pod's hosts file holds
        self._task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    # -- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod {self.key}")
        self._status_task = asyncio.create_task(self._status_loop(), name=f"status {self.key}")

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self.terminating.is_set():
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is not None:
                self.grace_s = float(grace)
            log.info("Began terminating pod %s (grace %.0f s)", self.key, self.grace_s)
            self.terminating.set()
            self.changed()

    def changed(self) -> None:
        self._dirty.set()
        self.agent.topology_changed()

    @property
    def ready(self) -> bool:
        return bool(self.containers) and all(c.ready for c in self.containers) and not self.terminating.is_set()

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod["metadata"].get("labels") or {})

    def running(self) -> bool:
        return any(c.proc is not None and c.proc.returncode is None for c in self.containers)

    @property
    def hosts_path(self) -> Path:
        """The pod's /etc/hosts (bound over it in each container's mount namespace)."""
        return self.dir / "hosts"

    def write_hosts(self) -> None:
        """(Re)writes the pod's /etc/hosts in place when the Services it names changed (also at start)."""
        text = build_hosts_file(self.ns, self.name, self.ip, self.agent.proxy.virtual_ips(bridge=bool(self.netns)),
                                self.agent.node_hosts)
        if text != self._hosts:
            write_in_place(self.hosts_path, text)
            self._hosts = text

    def port_by_name(self, name: str) -> int | None:
        for c in self.containers:
            for p in c.spec.get("ports") or []:
                if p.get("name") == name:
                    return int(p["containerPort"])
        return None

    async def _run(self) -> None:
        body = asyncio.create_task(self._run_body(), name=f"containers {self.key}")
        await self.terminating.wait()
        await self._stop_all(self.grace_s)
        try:
            await asyncio.wait_for(body, 5)
        except (TimeoutError, asyncio.CancelledError):
            body.cancel()
        await self._stop_all(0)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        await self._finish()

    async def _run_body(self) -> None:
        try:
            await self._run_pod()
        except Exception as error:  # noqa: BLE001 - one pod's failure must not stop the agent
            log.exception("Failed running pod %s", self.key)
            self.pod_error = f"node agent error: {error}"
            self.changed()

    async def _run_pod(self) -> None:
        unsupported = self._unsupported()
        self.start_time = now_iso()
        if unsupported:
            for c in [*self.init_containers, *self.containers]:
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": unsupported}}
            self.pod_error = unsupported
            self.changed()
            return
        ports = [int(p["containerPort"]) for c in self.containers for p in c.spec.get("ports") or []]
        if self.agent.network is not None and await self._in_pod_network():
            if self.terminating.is_set():
                return
            self.netns, self.ip = await self.agent.network.add_pod(self.uid)
            log.info("Gave pod %s address %s in network namespace %s", self.key, self.ip, self.netns)
        else:
            self.ip = self.agent.ips.allocate(ports)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        self.changed()
        volumes = await self._prepare_volumes()
        if volumes is None:
            return
        self._refresh_task = asyncio.create_task(self._refresh_volumes(volumes), name=f"volumes {self.key}")
        # Init containers one at a time, in order, each to completion; the regular containers only after the last.
        for c in self.init_containers:
            if not await self._supervise(c, volumes, init=True) or self.terminating.is_set():
                return
        if self.init_containers:
            log.info("Initialized pod %s (%d init container(s) completed)", self.key, len(self.init_containers))
            self.changed()
        await asyncio.gather(*(self._supervise(c, volumes) for c in self.containers))

    async def _in_pod_network(self) -> bool:
        """Whether the pod's namespace carries ``shipyard.dev/pod-network=bridge`` (read from the API server; tried
        again every 2 s while it cannot be read, until the pod is deleted)."""
        while not self.terminating.is_set():
            try:
                namespace = (await self.agent.client.get(Namespace, self.ns)).to_dict()
                labels = namespace["metadata"].get("labels") or {}
                return labels.get(POD_NETWORK_LABEL) == POD_NETWORK_BRIDGE
            except lightkube.ApiError as error:
                if error.status.code == 404:
                    return False
                log.warning("Could not read namespace %s for pod %s: %s", self.ns, self.key, error.status.message)
            except Exception as error:  # noqa: BLE001 - the API server unreachable: tried again
                log.warning("Could not read namespace %s for pod %s: %s", self.ns, self.key, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.terminating.wait(), CONFIG_RETRY_S)
        return False

    def _unsupported(self) -> str:
        for c in self.init_containers:
            if c.spec.get("restartPolicy") == "Always":
                return (f"init container {c.name}: restartPolicy Always (a sidecar container) is not supported by the "
                        "local node agent")
        for c in [*self.init_containers, *self.containers]:
            if not c.spec.get("command"):
                try:
                    entrypoint = self.agent.catalogue.resolve(c.spec.get("image", "")).entrypoint
                except ImagePullError:
                    entrypoint = ("(the pull reports it)",)
                if not entrypoint:
                    return (f"container {c.name}: sets no command and its image has no entrypoint in the local image "
                            "catalogue (hack/e2e-images.yaml)")
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.spec.get(kind) or {}
                if probe and not (probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")):
                    return f"container {c.name}: {kind}: only httpGet, tcpSocket and grpc probes are supported"
        return ""

    async def _prepare_volumes(self) -> dict[str, Path] | None:
        """Host directories of the pod's volumes; None (with the containers waiting) when one cannot be set up."""
        out: dict[str, Path] = {}
        base = self.dir / "volumes"
        deadline = time.monotonic() + 120
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            while True:
                try:
                    out[name] = await self._prepare_volume(volume, base / name)
                    break
                except UnsupportedVolume as error:
                    for c in [*self.init_containers, *self.containers]:
                        c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                    self.pod_error = str(error)
                    self.agent.post_event(self.pod, "Warning", "FailedMount", str(error))
                    self.changed()
                    return None
                except ImagePullFailed as error:
                    if not await self._image_pull_backoff(error):
                        return None
                except VolumeNotReady as error:
                    for c in [*self.init_containers, *self.containers]:
                        c.state = {"waiting": {"reason": self.waiting_reason, "message": str(error)}}
                    self.changed()
                    if time.monotonic() > deadline:
                        self.agent.post_event(self.pod, "Warning", "FailedMount", str(error))
                        deadline = time.monotonic() + 120
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.terminating.wait(), 2)
                    if self.terminating.is_set():
                        return None
        return out

    async def _image_pull_backoff(self, error: ImagePullFailed) -> bool:
        """After a failed image volume pull: ErrImagePull, then ImagePullBackOff until the back-off has passed;
        False when the pod is being deleted meanwhile."""
        for c in [*self.init_containers, *self.containers]:
            c.state = {"waiting": {"reason": "ErrImagePull", "message": str(error)}}
        self.agent.post_event(self.pod, "Warning", "Failed", str(error))
        self.changed()
        wait = self.image_backoff
        self.image_backoff = min(self.image_backoff * 2, BACKOFF_MAX_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.terminating.wait(), min(2.0, wait))
        if self.terminating.is_set():
            return False
        message = f'Back-off pulling image "{error.reference}": {error.reason}'
        for c in [*self.init_containers, *self.containers]:
            c.state = {"waiting": {"reason": "ImagePullBackOff", "message": message}}
        self.agent.post_event(self.pod, "Normal", "BackOff", message)
        self.changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.terminating.wait(), max(0.0, wait - 2.0))
        return not self.terminating.is_set()

    async def _pull_image_volume(self, volume: dict[str, Any], path: Path) -> Path:
        """An image volume: the reference fetched into `path` by `shipyard-runtime fetch` (ImagePullFailed with
        fetch's one-line reason when it fails)."""
        source = volume["image"] or {}
        reference = str(source.get("reference") or "")
        if not reference:
            raise UnsupportedVolume(f"volume {volume['name']!r}: image.reference is required")
        argv = build_image_volume_fetch(self.agent.python, reference, path, self.agent.workdir / IMAGE_VOLUME_CACHE,
                                        self.agent.args.registry_ca, self.agent.args.registry_config)
        self.agent.post_event(self.pod, "Normal", "Pulling", f'Pulling image "{reference}" for volume '
                              f"{volume['name']!r}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("contract", "runtime")),
               "SHIPYARD_TERMINATION_LOG": ""}
        env = {k: v for k, v in env.items() if not k.startswith("SHIPYARD_FETCH_")}
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        line = (out.decode(errors="replace").strip().splitlines() or [""])[-1]
        if process.returncode != 0:
            log.warning("Pull of image volume %r of pod %s failed: %s", volume["name"], self.key,
                        line or err.decode(errors="replace")[-500:])
            raise ImagePullFailed(reference, volume["name"], line or f"fetch exited with {process.returncode}")
        log.info("Pulled image volume %r of pod %s in %.1f s: %s", volume["name"], self.key,
                 time.monotonic() - started, line)
        self.agent.post_event(self.pod, "Normal", "Pulled", f'Successfully pulled image "{reference}" for volume '
                              f"{volume['name']!r} in {time.monotonic() - started:.1f}s")
        os.chmod(path, 0o755)
        return path

    async def _prepare_volume(self, volume: dict[str, Any], path: Path) -> Path:
        client = self.agent.client
        if "image" in volume:
            return await self._pull_image_volume(volume, path)
        if "emptyDir" in volume:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)
            return path
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                pvc = (await client.get(PersistentVolumeClaim, claim, namespace=self.ns)).to_dict()
                if (pvc.get("status") or {}).get("phase") != "Bound":
                    raise VolumeNotReady(f"persistentvolumeclaim {claim!r} is not bound")
                pv = (await client.get(PersistentVolume, pvc["spec"]["volumeName"])).to_dict()
            except lightkube.ApiError as error:
                raise VolumeNotReady(f"persistentvolumeclaim {claim!r}: {error.status.message}") from None
            source = (pv["spec"].get("hostPath") or pv["spec"].get("local") or {}).get("path")
            target = Path(source) if source else self.agent.workdir / "pvc" / self.ns / claim
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, 0o777)  # as a local-path provisioner creates them
            return target
        if "hostPath" in volume:
            target = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                target.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                raise VolumeNotReady(f"hostPath {target} does not exist")
            return target
        if "configMap" in volume or "secret" in volume:
            await self._project(volume, path)
            return path
        raise UnsupportedVolume(f"volume {volume['name']!r}: this volume type is not supported by the local node agent "
                                "(for the service account token volume: automountServiceAccountToken: false)")

    async def _project(self, volume: dict[str, Any], path: Path, refresh: bool = False) -> bool:
        """Writes a configMap or secret volume's files into `path` from the object read now (sync_projected_files:
        each changed file replaced atomically, a removed key's file deleted); whether anything changed. A missing
        object that is not optional raises VolumeNotReady at the start; on a refresh its files stay as they were, as
        a kubelet keeps them. A missing optional one is an empty directory."""
        kind = "configMap" if "configMap" in volume else "secret"
        source = volume[kind]
        obj_name = source.get("name") or source.get("secretName")
        try:
            obj = (await self.agent.client.get(ConfigMap if kind == "configMap" else Secret, obj_name,
                                               namespace=self.ns)).to_dict()
        except lightkube.ApiError as error:
            if error.status.code == 404 and source.get("optional"):
                obj = {}
            elif refresh:
                return False
            else:
                raise VolumeNotReady(f"{kind} {obj_name!r} not found: {error.status.message}") from None
        files = write_projection(kind, obj, source.get("items"))
        modes = {item["path"]: int(item["mode"]) for item in source.get("items") or [] if item.get("mode") is not None}
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)
        return sync_projected_files(path, files, int(source.get("defaultMode", 0o644)), modes)

    async def _refresh_volumes(self, volumes: dict[str, Path]) -> None:
        """As a kubelet syncs them: every VOLUME_REFRESH_S the pod's configMap and secret volumes are brought up to
        date with their objects while the pod runs (a subPath mount of one of their files is not: it holds the old
        file, as with a kubelet)."""
        projected = [v for v in self.spec.get("volumes") or [] if ("configMap" in v or "secret" in v)
                     and v["name"] in volumes]
        while projected and not self.terminating.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.terminating.wait(), VOLUME_REFRESH_S)
            if build_phase(self.spec.get("restartPolicy", "Always"), self.init_containers,
                           self.containers) in ("Succeeded", "Failed"):
                return  # nothing runs any more
            for volume in projected:
                if self.terminating.is_set():
                    return
                try:
                    if await self._project(volume, volumes[volume["name"]], refresh=True):
                        log.info("Updated volume %r of pod %s", volume["name"], self.key)
                except Exception as error:  # noqa: BLE001 - tried again at the next refresh
                    log.warning("Could not refresh volume %r of pod %s: %s", volume["name"], self.key, error)

    # -- containers
    async def _supervise(self, c: ContainerRun, volumes: dict[str, Path], init: bool = False) -> bool:
        """Runs a container, restarted as the pod's restartPolicy says; whether it ended by completing (exit 0, not
        deleted). An init container has no probes and, under restartPolicy Always, is restarted only on failure (a
        kubelet treats Always as OnFailure for it)."""
        policy = self.spec.get("restartPolicy", "Always")
        if init and policy == "Always":
            policy = "OnFailure"
        backoff = BACKOFF_INITIAL_S
        try:
            c.image = await self._pull(c)
        except ImagePullError as error:
            c.state = {"waiting": {"reason": "ErrImagePull", "message": str(error)}}
            self.agent.post_event(self.pod, "Warning", "Failed", str(error))
            self.changed()
            return False
        while not self.terminating.is_set():
            try:
                c.env_sources = await self._fetch_env_sources(c)
                argv, env, mounts, user = self._container_config(c, volumes)
            except ContainerConfigError as error:
                # As a kubelet: the container waits, and its config is tried again (a Secret created later, ...).
                if c.state.get("waiting", {}).get("message") != str(error):
                    log.warning("Could not configure %s %s/%s: %s", "init container" if init else "container",
                                self.key, c.name, error)
                    self.agent.post_event(self.pod, "Warning", "Failed", f"Error: {error}")
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                self.changed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.terminating.wait(), CONFIG_RETRY_S)
                continue
            started_at = now_iso()
            ran_for = time.monotonic()
            await self._spawn(c, argv, env, mounts, user)
            if self.terminating.is_set():
                await self._stop_container(c, 0)
            c.state = {"running": {"startedAt": started_at}}
            self.agent.post_event(self.pod, "Normal", "Started", f"Started container {c.name}")
            self.changed()
            probes = None if init else asyncio.create_task(self._probe(c), name=f"probes {self.key}/{c.name}")
            assert c.proc is not None
            code = await c.proc.wait()
            if probes is not None:
                probes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probes
            c.ready = c.started = False
            exit_code = code if code >= 0 else 128 - code
            c.state = {"terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "message": self._termination_message(c, exit_code),
                "startedAt": started_at, "finishedAt": now_iso(), "containerID": c.container_id,
            }}
            if not c.state["terminated"]["message"]:
                del c.state["terminated"]["message"]
            self._remove_cgroup(c)
            log.info("%s %s/%s exited with %d%s", "Init container" if init else "Container", self.key, c.name,
                     exit_code, f" ({c.killing})" if c.killing else "")
            self.changed()
            if self.terminating.is_set() or policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                return exit_code == 0 and not self.terminating.is_set()
            if time.monotonic() - ran_for > 600:
                backoff = BACKOFF_INITIAL_S
            c.last_state = c.state
            c.restart_count += 1
            c.killing = ""
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {backoff:.0f}s restarting failed container={c.name} "
                                              f"pod={self.name}"}}
            self.agent.post_event(self.pod, "Warning", "BackOff", c.state["waiting"]["message"])
            self.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.terminating.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        return False

    async def _fetch_env_sources(self, c: ContainerRun) -> dict[tuple[str, str], dict[str, Any] | None]:
        """The Secrets and ConfigMaps the container's env names (None: not found), read from the API server."""
        out: dict[tuple[str, str], dict[str, Any] | None] = {}
        for kind, name in build_env_references(c.spec):
            try:
                obj = await self.agent.client.get(Secret if kind == "secret" else ConfigMap, name, namespace=self.ns)
                out[(kind, name)] = obj.to_dict()
            except lightkube.ApiError as error:
                if error.status.code != 404:
                    raise ContainerConfigError(f"{kind} {json.dumps(name)}: {error.status.message}") from None
                out[(kind, name)] = None
            except Exception as error:  # noqa: BLE001 - the API server unreachable: tried again, as a kubelet would
                raise ContainerConfigError(f"couldn't get {kind} {self.ns}/{name}: {error}") from None
        return out

    async def _pull(self, c: ContainerRun) -> Image:
        image = self.agent.catalogue.resolve(c.spec.get("image", ""))
        missing = [b for b in image.contents.values() if not self.agent.catalogue.build_dir(b).is_dir()]
        if missing:
            c.state = {"waiting": {"reason": self.waiting_reason, "message": f"Pulling image {image.reference}"}}
            self.agent.post_event(self.pod, "Normal", "Pulling", f'Pulling image "{image.reference}" '
                                  f"(building its contents {', '.join(missing)} locally)")
            self.changed()
        for build in image.contents.values():
            await self.agent.catalogue.prepare(build)
        self.agent.post_event(self.pod, "Normal", "Pulled", f'Container image "{image.reference}" is present '
                              "in the local image catalogue")
        return image

    def _container_config(self, c: ContainerRun, volumes: dict[str, Path],
                          ) -> tuple[list[str], dict[str, str], list[Mount], tuple[int, int, list[int]] | None]:
        assert c.image is not None
        spec = c.spec
        argv = build_argv(spec, c.image)
        env: dict[str, str] = {
            "PATH": f"{self.agent.venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOSTNAME": self.name,
            "HOME": "/",
            "PYTHONUNBUFFERED": "1",
            # {pod_ip} in an image's env: the stand-in for a pod's own network namespace, where a third-party
            # server binding 0.0.0.0 would not clash with the other pods (they all share this machine's here)
            **{k: v.replace("{pod_ip}", self.ip) for k, v in c.image.env.items()},
        }
        fields = {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                  "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": "127.0.0.1",
                  "status.hostIPs": "127.0.0.1", "spec.nodeName": self.agent.node,
                  "spec.serviceAccountName": str(self.spec.get("serviceAccountName") or "default")}
        allocatable = {"cpu": str(self.agent.args.cpu), "memory": str(self.agent.args.memory)}
        # envFrom then env over the image's ENV, as the kubelet and the container runtime merge them; command and
        # args see only the declared variables, as the kubelet expands them (c.env_sources: read by _supervise).
        declared = build_container_env(self.pod, spec, c.env_sources, fields, allocatable)
        env.update(declared)
        if "$" in " ".join(argv):
            argv = [_expand(a, declared) for a in argv]
        if tuple(argv[:2]) == SERVE_ARGV and "--host" not in argv:
            argv += ["--host", self.ip]  # the runtime reads its bind address from flags only
        mounts = [Mount(self.agent.catalogue.build_dir(build), path, True) for path, build in c.image.contents.items()]
        for vm in spec.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                raise ContainerConfigError(f"volumeMount {vm['name']!r}: no such volume")
            source = volumes[vm["name"]]
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            read_only = bool(vm.get("readOnly"))
            for v in self.spec.get("volumes") or []:
                if v["name"] == vm["name"] and ("image" in v or (v.get("persistentVolumeClaim") or {}).get("readOnly")):
                    read_only = True  # an image volume is read-only whatever the mount says, as a kubelet mounts it
            mounts.append(Mount(source, vm["mountPath"], read_only))
        termination = self.dir / c.name / "termination-log"
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.write_bytes(b"")
        os.chmod(termination, 0o666)
        mounts.append(Mount(termination, spec.get("terminationMessagePath", "/dev/termination-log"), False))
        mounts.append(Mount(self.hosts_path, "/etc/hosts", True))  # Service names, as cluster DNS resolves them
        user = self._user(c)
        if (user is None or user[0] == 0) and "HOME" not in declared:
            env["HOME"] = "/root"
        return argv, env, mounts, user

    def _user(self, c: ContainerRun) -> tuple[int, int, list[int]] | None:
        pod_sc = self.spec.get("securityContext") or {}
        sc = c.spec.get("securityContext") or {}
        image_user = c.image.user if c.image is not None else None
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", image_user[0] if image_user else None))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if uid is None:
            if non_root:
                raise ContainerConfigError("container has runAsNonRoot and image will run as root")
            return None
        gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", image_user[1] if image_user else 0)))
        groups = [int(g) for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])] if g is not None]
        if non_root and int(uid) == 0:
            raise ContainerConfigError("container's runAsUser breaks non-root policy")
        return int(uid), gid, groups

    async def _spawn(self, c: ContainerRun, argv: list[str], env: dict[str, str], mounts: list[Mount],
                     user: tuple[int, int, list[int]] | None) -> None:
        lines = ["set -e"]
        if self.agent.network is not None:
            # The copy of /run/netns this mount namespace got would keep every network namespace named there alive
            # (other pods', the stack's) for as long as the container runs: let go of it (the pod's own network
            # namespace is the process's already).
            lines.append("umount --recursive --lazy /run/netns 2>/dev/null || true")
        cpu = ((c.spec.get("resources") or {}).get("limits") or {}).get("cpu")
        if cpu and self.agent.cgroups is not None:
            plan = cgroups.plan_cpu_limit(self.agent.cgroups.version, self.agent.cgroup_name, f"{self.uid}-{c.name}",
                                          str(cpu))
            c.cgroup = cgroups.apply_cpu_limit(self.agent.cgroups, plan)
            lines.append(f"echo $$ > {shlex.quote(str(c.cgroup / 'cgroup.procs'))}")
            mounts = [*mounts, Mount(c.cgroup, plan.pod_mount, True)]  # the process sees its own limit
        # The "image" is this checkout and its Python: a volume mounted above them (an emptyDir at /tmp over a
        # checkout under /tmp) must not hide them, so they are bound back in, read-only, beneath that volume.
        targets = [Path(m.target) for m in mounts]
        # (The venv's parent too: an editable install imports from the checkout that holds the venv.)
        for image_path in {REPO.resolve(), Path(sys.prefix).resolve().parent, Path(sys.base_prefix).resolve()}:
            if any(t != image_path and t in image_path.parents for t in targets):
                mounts = [*mounts, Mount(image_path, str(image_path), True)]
        # Every source is opened before the first mount: a target (say /tmp) may hide a later source beneath it.
        # The mounts then bind the open descriptors (-c: no path canonicalisation of /proc/self/fd/N).
        ordered = sorted(mounts, key=lambda m: m.target.rstrip("/").count("/"))
        for fd, m in enumerate(ordered, start=10):
            self.agent.mountpoints.ensure(Path(m.target), m.source.is_file())
            lines.append(f"exec {fd}<{shlex.quote(str(m.source))}")
        for fd, m in enumerate(ordered, start=10):
            dst = shlex.quote(m.target)
            if m.source.is_dir():  # inside a volume mounted just before, the mountpoint may not exist yet
                lines.append(f"mkdir -p {dst}")
            lines.append(f"mount -c --bind /proc/self/fd/{fd} {dst}")
            if m.read_only:
                lines.append(f"mount -c -o remount,bind,ro {dst}")
            lines.append(f"exec {fd}<&-")
        lines.append(f"cd {shlex.quote(c.spec.get('workingDir') or '/')}")
        prefix = ""
        if user is not None:
            uid, gid, groups = user
            group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
            nnp = " --no-new-privs" if (c.spec.get("securityContext") or {}).get(
                "allowPrivilegeEscalation") is False else ""
            prefix = f"setpriv --reuid={uid} --regid={gid} {group_flag}{nnp} -- "
        lines.append(f'exec {prefix}"$@"')
        script = self.dir / c.name / "start.sh"
        script.write_text("\n".join(lines) + "\n")
        # The command is shown as written ($(VAR) not expanded): an expanded argument may hold a Secret's value.
        written = build_argv(c.spec, c.image) if c.image is not None else argv
        shown = shlex.join([*written, *argv[len(written):]])
        # In the pod network: nsenter joins the pod's network namespace first, then unshare makes the mount namespace.
        netns = ["nsenter", f"--net={NETNS_DIR / self.netns}"] if self.netns else []
        c.proc = await proc.spawn_async(
            [*netns, "unshare", "-m", "--propagation", "private", "/bin/bash", str(script), *argv],
            self.agent.workdir / "logs" / f"{self.ns}_{self.name}_{c.name}.log", env=env,
            header=f"--- {now_iso()} started {shown}\n")
        c.container_id = f"shipyard-local://{self.uid}/{c.name}/{c.restart_count}/{c.proc.pid}"
        log.info("Started container %s/%s as pid %d on %s: %s", self.key, c.name, c.proc.pid, self.ip, shown)

    def _termination_message(self, c: ContainerRun, exit_code: int) -> str:
        path = self.dir / c.name / "termination-log"
        message = ""
        with contextlib.suppress(OSError):
            message = path.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace").strip()
        if not message and exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            log_path = self.agent.workdir / "logs" / f"{self.ns}_{self.name}_{c.name}.log"
            with contextlib.suppress(OSError):
                lines = log_path.read_bytes()[-65536:].decode(errors="replace").splitlines()
                message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-2048:]
        return message

    def _remove_cgroup(self, c: ContainerRun) -> None:
        if c.cgroup is not None:
            with contextlib.suppress(OSError):
                c.cgroup.rmdir()
            c.cgroup = None

    # -- probes
    async def _probe(self, c: ContainerRun) -> None:
        spec = c.spec
        startup = spec.get("startupProbe")
        if startup and not await self._probe_until(c, startup, "Startup"):
            return
        c.started = True
        self.changed()
        await asyncio.gather(self._readiness(c, spec.get("readinessProbe")),
                             self._liveness(c, spec.get("livenessProbe")))

    async def _probe_until(self, c: ContainerRun, probe: dict[str, Any], kind: str) -> bool:
        """Runs a startup probe until it succeeds (True) or exceeds its failure threshold (kills; False)."""
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        failures = 0
        threshold = int(probe.get("failureThreshold", 3))
        while True:
            ok, message = await self._check(probe)
            if ok:
                return True
            failures += 1
            if failures >= threshold:
                await self._kill_unhealthy(c, f"{kind} probe failed: {message}")
                return False
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def _readiness(self, c: ContainerRun, probe: dict[str, Any] | None) -> None:
        if not probe:
            c.ready = True
            self.changed()
            return
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        successes = failures = 0
        while True:
            ok, message = await self._check(probe)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            ready = c.ready
            if ok and successes >= int(probe.get("successThreshold", 1)):
                ready = True
            elif not ok and failures >= int(probe.get("failureThreshold", 3)):
                ready = False
            if ready != c.ready:
                c.ready = ready
                log.info("Container %s/%s became %s", self.key, c.name, "ready" if ready else f"unready: {message}")
                self.changed()
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def _liveness(self, c: ContainerRun, probe: dict[str, Any] | None) -> None:
        if not probe:
            return
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        failures = 0
        while True:
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))
            ok, message = await self._check(probe)
            failures = 0 if ok else failures + 1
            if failures >= int(probe.get("failureThreshold", 3)):
                await self._kill_unhealthy(c, f"Liveness probe failed: {message}")
                return

    async def _kill_unhealthy(self, c: ContainerRun, message: str) -> None:
        log.warning("Killing container %s/%s: %s", self.key, c.name, message)
        self.agent.post_event(self.pod, "Warning", "Unhealthy", message)
        c.killing = message
        await self._stop_container(c, self.grace_s)

    async def _check(self, probe: dict[str, Any]) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        if probe.get("tcpSocket"):
            port = self._resolve_port(probe["tcpSocket"]["port"])
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.ip, port), timeout)
                writer.close()
                return True, ""
            except (OSError, TimeoutError) as error:
                return False, f"dial tcp {self.ip}:{port}: {error}"
        if probe.get("grpc"):
            return await check_grpc_health(self.ip, int(probe["grpc"]["port"]), str(probe["grpc"].get("service", "")),
                                           timeout)
        get = probe["httpGet"]
        port = self._resolve_port(get["port"])
        url = f"http://{self.ip}:{port}{get.get('path', '/')}"
        try:
            async with self.agent.http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await response.read()
                if 200 <= response.status < 400:
                    return True, ""
                return False, f"HTTP probe failed with statuscode: {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            return False, f'Get "{url}": {type(error).__name__} {error}'

    def _resolve_port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        resolved = self.port_by_name(str(port))
        if resolved is None:
            raise ValueError(f"no container port named {port!r}")
        return resolved

    # -- termination
    async def _stop_container(self, c: ContainerRun, grace_s: float) -> None:
        # The preStop hook first (sleep only: exec and httpGet hooks are not supported), within the grace period, while
        # the proxy already sends the pod no new connection; then SIGTERM, SIGKILL after what is left of the grace
        # period; anything the container left in its process group goes with it.
        sleep_s = float((((c.spec.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0))
        if c.proc is not None and c.proc.returncode is None and grace_s > 0 and sleep_s > 0:
            hook_s = min(sleep_s, grace_s)
            log.info("Running the preStop hook of %s/%s: sleep %.0f s", self.key, c.name, hook_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.proc.wait()), hook_s)
            grace_s -= hook_s
        if c.proc is not None and await proc.stop_async(c.proc, max(grace_s, 0.0)):
            log.warning("Killed container %s/%s after its grace period of %.0f s", self.key, c.name, grace_s)

    async def _stop_all(self, grace_s: float) -> None:
        self.changed()
        await asyncio.gather(*(self._stop_container(c, grace_s) for c in [*self.init_containers, *self.containers]))

    async def _finish(self) -> None:
        """After termination: report the final status, delete the pod object with grace 0, free the sandbox."""
        for c in [*self.init_containers, *self.containers]:
            self._remove_cgroup(c)
        self._dirty.set()
        await asyncio.sleep(0.2)
        if self._status_task is not None:
            self._status_task.cancel()
        if not self.agent.stopping:
            try:
                await self.agent.client.delete(Pod, self.name, namespace=self.ns, grace_period=0)
                log.info("Deleted pod %s", self.key)
            except lightkube.ApiError as error:
                if error.status.code != 404:
                    log.warning("Could not delete pod %s: %s", self.key, error.status.message)
        if self.netns and self.agent.network is not None:
            await self.agent.network.remove_pod(self.uid, self.ip)
            log.info("Removed network namespace %s of pod %s", self.netns, self.key)
        else:
            self.agent.ips.release(self.ip)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.done.set()
        self.agent.forget(self)

    async def stop_for_shutdown(self, grace_cap_s: float) -> None:
        self.grace_s = min(self.grace_s, grace_cap_s)
        self.terminating.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), grace_cap_s + 10)

    # -- status
    def build_status(self) -> dict[str, Any]:
        containers = self.containers
        phase = build_phase(self.spec.get("restartPolicy", "Always"), self.init_containers, containers)
        ready = self.ready
        incomplete = build_incomplete_init(self.init_containers)
        conditions = {
            "PodReadyToStartContainers": bool(self.ip),
            "Initialized": not incomplete,
            "ContainersReady": ready,
            "Ready": ready,
        }
        if phase in ("Succeeded", "Failed"):
            conditions["ContainersReady"] = conditions["Ready"] = False
        out_conditions = [c for c in self.pod.get("status", {}).get("conditions") or [] if c["type"] == "PodScheduled"]
        for ctype, value in conditions.items():
            text = "True" if value else "False"
            previous = self.transitions.get(ctype)
            if previous is None or previous[0] != text:
                self.transitions[ctype] = (text, now_iso())
            condition = {"type": ctype, "status": text, "lastTransitionTime": self.transitions[ctype][1],
                         "lastProbeTime": None}
            if ctype in ("ContainersReady", "Ready") and not value:
                unready = [c.name for c in containers if not c.ready]
                condition["reason"] = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
                condition["message"] = f"containers with unready status: [{' '.join(unready)}]"
            if ctype == "Initialized" and not value:
                condition["reason"] = "ContainersNotInitialized"
                condition["message"] = f"containers with incomplete status: [{' '.join(incomplete)}]"
            out_conditions.append(condition)
        status = {
            "phase": phase,
            "conditions": out_conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "containerStatuses": [build_container_status(c) for c in containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [build_container_status(c, init=True) for c in self.init_containers]
        if self.start_time:
            status["startTime"] = self.start_time
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.pod_error:
            status["message"] = self.pod_error
        return status

    async def _status_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            status = self.build_status()
            text = json.dumps(status, sort_keys=True)
            if text == self._last_status:
                continue
            try:
                await self.agent.client.patch(Pod.Status, self.name, {"status": status}, namespace=self.ns,
                                              patch_type=PatchType.MERGE)
                self._last_status = text
            except lightkube.ApiError as error:
                if error.status.code == 404:
                    return
                log.warning("Could not patch the status of pod %s: %s", self.key, error.status.message)
                await asyncio.sleep(1)
                self._dirty.set()
            except Exception as error:  # noqa: BLE001 - transient API failures: retry
                log.warning("Could not patch the status of pod %s: %s", self.key, error)
                await asyncio.sleep(1)
                self._dirty.set()


def build_container_status(c: ContainerRun, init: bool = False) -> dict[str, Any]:
    """An entry of ``containerStatuses`` or, with `init`, of ``initContainerStatuses`` as a kubelet writes it (pure).
    An init container is ready once it completed (terminated with exit code 0) and started while it runs."""
    ready, started = c.ready, c.started
    if init:
        terminated = c.state.get("terminated")
        ready = terminated is not None and terminated.get("exitCode") == 0
        started = "running" in c.state
    status: dict[str, Any] = {
        "name": c.name, "image": c.spec.get("image", ""), "imageID": c.image.image_id if c.image else "",
        "ready": ready, "started": started, "restartCount": c.restart_count, "state": c.state,
        "lastState": c.last_state,
    }
    if c.container_id:
        status["containerID"] = c.container_id
    return status


def _completed(c: ContainerRun) -> bool:
    return (c.state.get("terminated") or {}).get("exitCode") == 0


def _failed_init(c: ContainerRun) -> bool:
    """An init container whose last run failed: terminated non-zero, or waiting to restart after such a run."""
    if "terminated" in c.state:
        return bool(c.state["terminated"].get("exitCode"))
    return "waiting" in c.state and bool((c.last_state.get("terminated") or {}).get("exitCode"))


def build_incomplete_init(init: list[ContainerRun]) -> list[str]:
    """The init containers that have not completed, in order (pure): the pod is ``Initialized`` when there are none."""
    return [c.name for c in init if not _completed(c)]


def build_phase(policy: str, init: list[ContainerRun], containers: list[ContainerRun]) -> str:
    """The pod's phase from its containers' states, as a kubelet's getPhase decides it (pure): Pending while an init
    container has not completed (Failed once one failed under restartPolicy Never); then Pending until every
    container ran, Running while one runs or will be restarted, Succeeded or Failed when all ended for good."""
    if policy == "Never" and any(_failed_init(c) for c in init):
        return "Failed"
    if build_incomplete_init(init):
        return "Pending"
    if containers and all("terminated" in c.state for c in containers) and policy != "Always":
        phase = "Succeeded" if all(_completed(c) for c in containers) else "Failed"
        return "Running" if policy == "OnFailure" and phase == "Failed" else phase
    if containers and all(c.restart_count > 0 or "waiting" not in c.state for c in containers):
        return "Running"
    return "Pending"


class VolumeNotReady(Exception):
    """A volume's source (PVC, ConfigMap, Secret) is not there yet."""


class ImagePullFailed(Exception):
    """An image volume's pull failed (the kubelet's ErrImagePull): retried with back-off."""

    def __init__(self, reference: str, volume: str, reason: str) -> None:
        super().__init__(f'Failed to pull image "{reference}" for volume {volume!r}: {reason}')
        self.reference = reference
        self.reason = reason


def build_image_volume_fetch(python: str, reference: str, dest: Path, cache: Path, ca: str | None,
                             registry_config: str | None) -> list[str]:
    """The fetch command line that pulls an image volume (pure): the reference as an oci:// URI (a scheme in the
    reference is refused by fetch's parser), the whole content (`--path /`), the node cache."""
    argv = [python, "-m", "shipyard.runtime.cli", "fetch", "--uri", f"oci://{reference}", "--dest", str(dest),
            "--path", "/", "--cache", str(cache), "--termination-log", ""]
    if ca:
        argv += ["--ca-bundle", ca]
    if registry_config:
        argv += ["--registry-config", registry_config]
    return argv


class UnsupportedVolume(Exception):
    """A volume type the agent cannot provide (projected, CSI, ...): the pod cannot start."""


class ContainerConfigError(Exception):
    """The container cannot be configured (the kubelet's CreateContainerConfigError)."""


async def check_grpc_health(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    """A gRPC probe as the kubelet runs it: grpc.health.v1.Health/Check, healthy when the answer is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return False, f"gRPC probe {host}:{port}: {error.code().name} {error.details()}"
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return False, f'service unhealthy (responded with "{status}")'
    return True, ""


def build_argv(container: Mapping[str, Any], image: Image) -> list[str]:
    """A container's argv as a container runtime builds it from the image (pure): ``command`` replaces the image's
    ENTRYPOINT (and drops its CMD), ``args`` replace CMD."""
    command = container.get("command") or []
    args = container.get("args") or []
    if command:
        return [*command, *args]
    return [*image.entrypoint, *(args or image.cmd)]


def _expand(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a command, argument or env value (pure): ``$(NAME)`` of a defined
    variable is replaced by its value, ``$$`` is a literal ``$``, anything else stays as written."""
    return _EXPANSION.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


_EXPANSION = re.compile(r"\$\$|\$\(([^)]*)\)")  # a name is all up to the first ")", as the kubelet reads it


# ---------------------------------------------------------------------------------------------- container env

_SUBSCRIPTED = re.compile(r"^(metadata\.labels|metadata\.annotations)\['(.*)'\]$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_QUANTITY_SCALE = {suffix: fractions.Fraction(base) ** power for suffix, base, power in (
    ("", 10, 0), ("n", 10, -9), ("u", 10, -6), ("m", 10, -3), ("k", 10, 3), ("M", 10, 6), ("G", 10, 9), ("T", 10, 12),
    ("P", 10, 15), ("E", 10, 18), ("Ki", 2, 10), ("Mi", 2, 20), ("Gi", 2, 30), ("Ti", 2, 40), ("Pi", 2, 50),
    ("Ei", 2, 60))}


def build_env_references(container: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The Secrets and ConfigMaps a container's env and envFrom name, as ("secret" | "configmap", name) in order of
    first mention (pure): what the agent reads before it builds the env."""
    refs: list[tuple[str, str]] = []
    for source in container.get("envFrom") or []:
        for field, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
            if source.get(field):
                refs.append((kind, str(source[field].get("name", ""))))
    for item in container.get("env") or []:
        value_from = item.get("valueFrom") or {}
        for field, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
            if value_from.get(field) and not item.get("value"):
                refs.append((kind, str(value_from[field].get("name", ""))))
    return list(dict.fromkeys(refs))


def build_container_env(pod: Mapping[str, Any], container: Mapping[str, Any],
                        objects: Mapping[tuple[str, str], Mapping[str, Any] | None], fields: Mapping[str, str],
                        allocatable: Mapping[str, str]) -> dict[str, str]:
    """The variables a container declares, as the kubelet's makeEnvironmentVariables (v1.36) builds them (pure).

    envFrom first, in order (a later source's key replaces an earlier one's; ``prefix`` prepended; every key taken,
    as the kubelet does since relaxed env var names went GA in 1.34), then each ``env`` entry in order, replacing
    what came before: ``value`` with ``$(VAR)`` expanded against the variables declared so far (not the image's),
    else ``valueFrom``: fieldRef (`fields` by path, labels and annotations from the pod), resourceFieldRef (limits not
    set default to the node's `allocatable`), configMapKeyRef, secretKeyRef (Secret data base64-decoded; bytes that
    are not UTF-8 reach the process unchanged). `objects` maps every ``build_env_references`` entry to the object
    read, None where the API server has none. A missing object or key that is not optional raises
    ContainerConfigError with the kubelet's message; an optional one is skipped."""
    namespace = str(pod["metadata"]["namespace"])
    env: dict[str, str] = {}

    def data(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = objects.get((kind, name))
        if obj is None:
            if optional:
                return None
            raise ContainerConfigError(f"{kind} {json.dumps(name)} not found")
        if kind == "configmap":
            return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}
        return {str(k): os.fsdecode(base64.b64decode(v)) for k, v in (obj.get("data") or {}).items()}

    for source in container.get("envFrom") or []:
        for field, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
            if source.get(field):
                ref = source[field]
                values = data(kind, str(ref.get("name", "")), bool(ref.get("optional")))
                prefix = str(source.get("prefix") or "")
                env.update({prefix + k: v for k, v in (values or {}).items()})
    for item in container.get("env") or []:
        name = str(item["name"])
        value_from = item.get("valueFrom") or {}
        if item.get("value") or not value_from:
            env[name] = _expand(str(item.get("value") or ""), env)
        elif value_from.get("fieldRef"):
            env[name] = build_field_value(pod, str(value_from["fieldRef"]["fieldPath"]), fields)
        elif value_from.get("resourceFieldRef"):
            env[name] = build_resource_value(pod, container, value_from["resourceFieldRef"], allocatable)
        else:
            for field, kind, title in (("configMapKeyRef", "configmap", "ConfigMap"), ("secretKeyRef", "secret",
                                                                                      "Secret")):
                if value_from.get(field):
                    ref = value_from[field]
                    ref_name, key, optional = str(ref.get("name", "")), str(ref["key"]), bool(ref.get("optional"))
                    values = data(kind, ref_name, optional)
                    if values is not None and key in values:
                        env[name] = values[key]
                    elif values is not None and not optional:
                        raise ContainerConfigError(f"couldn't find key {key} in {title} {namespace}/{ref_name}")
                    break
            else:
                raise ContainerConfigError(f"env {name}: this valueFrom is not supported by the local node agent")
    return env


def build_field_value(pod: Mapping[str, Any], path: str, fields: Mapping[str, str]) -> str:
    """A fieldRef's value (pure): `fields` (what the agent knows: the pod's name, namespace, uid and IPs, the node's
    name and IPs, ...) by path, else the pod's labels or annotations (one, or all as the kubelet formats them)."""
    if path in fields:
        return fields[path]
    meta = pod["metadata"]
    if subscripted := _SUBSCRIPTED.match(path):
        kind = "labels" if subscripted.group(1) == "metadata.labels" else "annotations"
        return str((meta.get(kind) or {}).get(subscripted.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):  # the kubelet's FormatMap: key="value" lines, sorted
        values = meta.get(path.split(".", 1)[1]) or {}
        return "\n".join(f"{k}={json.dumps(str(v))}" for k, v in sorted(values.items()))
    raise ContainerConfigError(f"unsupported fieldPath: {path}")


def parse_quantity(text: str) -> fractions.Fraction:
    """A Kubernetes resource quantity, exactly: ``500m`` -> 1/2, ``1Gi`` -> 2**30, ``1e3`` -> 1000 (pure)."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    number, exponent, suffix = match.groups()
    scale = fractions.Fraction(10) ** int(exponent[1:]) if exponent else _QUANTITY_SCALE[suffix or ""]
    return fractions.Fraction(number) * scale


def build_resource_value(pod: Mapping[str, Any], container: Mapping[str, Any], selector: Mapping[str, Any],
                         allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef's value as the kubelet's downward API gives it (pure): the container's (or, with
    ``containerName``, that container's) request or limit over the divisor (default 1), rounded up; CPU counted in
    millicores first, as Quantity.MilliValue does; a limit not set is the node's allocatable, a request not set 0."""
    target = container
    if selector.get("containerName"):
        spec = pod.get("spec") or {}
        named = [c for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
                 if c.get("name") == selector["containerName"]]
        if not named:
            raise ContainerConfigError(f"container {selector['containerName']} not found")
        target = named[0]
    kind, _, resource = str(selector.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or resource not in ("cpu", "memory", "ephemeral-storage"):
        raise ContainerConfigError(f"unsupported container resource : {selector.get('resource')}")
    resources = target.get("resources") or {}
    value = (resources.get(kind) or {}).get(resource)
    if value is None and kind == "limits":
        value = allocatable.get(resource)
    quantity = parse_quantity(str(value if value is not None else 0))
    divisor = parse_quantity(str(selector.get("divisor") or 1)) or fractions.Fraction(1)
    if resource == "cpu":
        return str(math.ceil(math.ceil(quantity * 1000) / math.ceil(divisor * 1000)))
    return str(math.ceil(math.ceil(quantity) / math.ceil(divisor)))


def write_projection(kind: str, obj: Mapping[str, Any], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
    """Files of a configMap or secret volume: key -> content (pure)."""
    import base64

    data: dict[str, bytes] = {}
    for key, value in (obj.get("data") or {}).items():
        data[key] = base64.b64decode(value) if kind == "secret" else str(value).encode()
    for key, value in (obj.get("binaryData") or {}).items():
        data[key] = base64.b64decode(value)
    if items:
        return {item["path"]: data[item["key"]] for item in items if item["key"] in data}
    return data


def sync_projected_files(path: Path, files: Mapping[str, bytes], mode: int,
                         modes: Mapping[str, int] | None = None) -> bool:
    """Brings the directory of a configMap or secret volume to `files` (relative path -> content, mode `mode` or the
    item's own in `modes`): a file whose content or mode differs is written beside it and renamed over it (a reader
    sees the old file or the new one, never part of one), a file no longer in `files` is deleted. Whether anything
    changed."""
    changed = False
    for rel, data in files.items():
        target = path / rel
        wanted = (modes or {}).get(rel, mode)
        with contextlib.suppress(OSError):
            if target.read_bytes() == data and stat.S_IMODE(target.stat().st_mode) == wanted:
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"..{target.name}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, wanted)
        os.replace(tmp, target)
        changed = True
    keep = {path / rel for rel in files}
    for existing in sorted(path.rglob("*"), reverse=True):
        if existing.is_file() and existing not in keep:
            existing.unlink()
            changed = True
        elif existing.is_dir() and not any(existing.iterdir()) and not any(k.is_relative_to(existing) for k in keep):
            existing.rmdir()
    return changed


def build_local_volume(namespace: str, claim: str, path: str, size: str = "1Gi") -> list[dict[str, Any]]:
    """A PersistentVolume on a host directory pre-bound to a claim, and the claim (pure): what a local-path
    provisioner would create. The agent mounts the PV's path into the pods that use the claim."""
    pv = f"{namespace}-{claim}"
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "hostPath": {"path": path, "type": "DirectoryOrCreate"},
                  "claimRef": {"namespace": namespace, "name": claim}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": size}}}},
    ]


# ------------------------------------------------------------------------------------------------ service proxy


@dataclasses.dataclass
class ServicePort:
    name: str
    port: int  # the Service's port: where its virtual IP listens
    target: int | str
    server: asyncio.AbstractServer  # 127.0.0.1:<local port> (services.json)
    local_port: int
    virtual: asyncio.AbstractServer | None = None  # <virtual IP>:<port>
    bridge: asyncio.AbstractServer | None = None  # <pod network virtual IP>:<port>, in the stack's namespace


class ServiceProxy:
    """kube-proxy's job for local pods: each Service port listens at the Service's virtual IP on its own port (what
    pods reach by name, through their hosts file) and at 127.0.0.1 on a free port (what the tests and the load
    generator use); each connection goes to one random ready endpoint. With a pod network, each Service also listens
    at a virtual IP of the pod network, inside the stack's namespace (what pods in that network reach by name)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.services: dict[str, tuple[dict[str, str], list[ServicePort]]] = {}
        self.ips = ServiceIPPool(agent.args.service_ip_prefix)
        self.network = agent.network
        self.conntrack = open(agent.workdir / "conntrack.jsonl", "a", buffering=1)  # noqa: SIM115 - lives on
        self.connections = 0
        self.write()  # none yet

    def virtual_ips(self, bridge: bool = False) -> dict[str, str]:
        """The virtual IP of every proxied Service that has one, by "ns/name": the loopback ones, or with `bridge`
        the pod network's."""
        if bridge:
            held = self.network.service_ips.held if self.network is not None else {}
            return {key: ip for key, ip in held.items() if key in self.services}
        return {key: ip for key, ip in self.ips.held.items() if key in self.services}

    async def sync(self, service: dict[str, Any], deleted: bool = False) -> None:
        meta = service["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        spec = service.get("spec") or {}
        selector = spec.get("selector") or {}
        if deleted or not selector:
            await self.remove(key)
            return
        wanted = [(str(p.get("name") or p["port"]), int(p["port"]), p.get("targetPort", p["port"]))
                  for p in spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
        current = self.services.get(key)
        if current and [(p.name, p.port, p.target) for p in current[1]] == wanted:
            self.services[key] = (selector, current[1])
            return
        self._close(key)  # its virtual IP stays its own
        ports = []
        for name, port, target in wanted:
            server = await asyncio.start_server(self._handler(key, target), "127.0.0.1", 0)
            local = server.sockets[0].getsockname()[1]
            ports.append(ServicePort(name, port, target, server, local))
        ip = await self._listen_virtual(key, ports)
        bridge_ip = await self._listen_bridge(key, ports) if self.network is not None else None
        for p in ports:
            log.info("Proxied service %s port %s at %s%s and 127.0.0.1:%d", key, p.name,
                     f"{ip}:{p.port}" if ip else "no virtual IP", f", {bridge_ip}:{p.port}" if bridge_ip else "",
                     p.local_port)
        self.services[key] = (selector, ports)
        self.write()

    def _handler(self, key: str, target: int | str) -> Any:
        return lambda r, w: self._forward(r, w, key, target)

    async def _listen_virtual(self, key: str, ports: list[ServicePort]) -> str | None:
        """Listens on every port of the Service at the first virtual IP free for all of them (its own first); None
        when none is (an error in the log: pods cannot reach it by name)."""
        problems: list[str] = []
        for ip in self.ips.candidates(key):
            servers: list[asyncio.AbstractServer] = []
            try:
                for p in ports:
                    servers.append(await asyncio.start_server(self._handler(key, p.target), ip, p.port))
            except OSError as error:
                for server in servers:
                    server.close()
                problems.append(f"{ip}: {error.strerror or error}")
                continue
            for p, server in zip(ports, servers, strict=True):
                p.virtual = server
            self.ips.assign(key, ip)
            return ip
        self.ips.release(key)
        log.error("Could not give service %s a virtual IP: ports %s are taken at every address (%s)", key,
                  [p.port for p in ports], "; ".join(problems[:3]))
        return None

    async def _listen_bridge(self, key: str, ports: list[ServicePort]) -> str | None:
        """Listens on every port of the Service at its virtual IP in the pod network (its own, else the next free
        one), an address on the stack's bridge; None when it cannot (an error in the log)."""
        assert self.network is not None
        problems: list[str] = []
        for ip in self.network.service_ips.candidates(key)[:3]:
            try:
                await self.network.add_service_ip(ip)
                sockets = self.network.listen(ip, [p.port for p in ports])
            except (OSError, RuntimeError) as error:
                problems.append(f"{ip}: {error}")
                continue
            for p, sock in zip(ports, sockets, strict=True):
                p.bridge = await asyncio.start_server(self._handler(key, p.target), sock=sock)
            previous = self.network.service_ips.held.get(key)
            self.network.service_ips.assign(key, ip)
            if previous and previous != ip:
                await self.network.remove_service_ip(previous)
            return ip
        log.error("Could not give service %s a virtual IP in the pod network: %s", key, "; ".join(problems))
        return None

    def _close(self, key: str) -> None:
        entry = self.services.pop(key, None)
        for p in entry[1] if entry else []:
            p.server.close()
            for server in (p.virtual, p.bridge):
                if server is not None:
                    server.close()

    async def remove(self, key: str) -> None:
        if key in self.services:
            self._close(key)
            self.ips.release(key)
            if self.network is not None:
                ip = self.network.service_ips.held.get(key)
                self.network.service_ips.release(key)
                if ip:
                    await self.network.remove_service_ip(ip)
            log.info("Stopped proxying service %s", key)
            self.write()

    def write(self) -> None:
        """services.json (the local ports), service-ips.json (the virtual IPs) and every pod's hosts file."""
        doc = {key: {p.name: p.local_port for p in ports} for key, (_, ports) in sorted(self.services.items())}
        write_atomic(self.agent.workdir / "services.json", json.dumps(doc, indent=2) + "\n")
        write_atomic(self.agent.workdir / "service-ips.json",
                     json.dumps(dict(sorted(self.virtual_ips().items())), indent=2) + "\n")
        if self.network is not None:
            write_atomic(self.agent.workdir / "pod-network-service-ips.json",
                         json.dumps(dict(sorted(self.virtual_ips(bridge=True).items())), indent=2) + "\n")
        for worker in list(self.agent.workers.values()):
            if worker.ip and not worker.done.is_set():
                worker.write_hosts()

    def endpoints(self, key: str, target: int | str) -> list[tuple[str, int, str]]:
        namespace = key.split("/", 1)[0]
        selector = self.services[key][0] if key in self.services else None
        if selector is None:
            return []
        out = []
        for worker in self.agent.workers.values():
            if worker.ns != namespace or not worker.ready or not worker.ip:
                continue
            labels = worker.labels
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            port = int(target) if isinstance(target, int) or str(target).isdigit() else worker.port_by_name(target)
            if port is not None:
                out.append((worker.ip, port, worker.name))
        return out

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str,
                       target: int | str) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        front = writer.get_extra_info("sockname") or ("", 0)
        frontend = f"{front[0]}:{front[1]}"  # the virtual IP and Service port, or 127.0.0.1 and the local port
        endpoints = self.endpoints(key, target)
        if not endpoints:
            writer.close()
            self._record(key, frontend, peer[1], None)
            return
        ip, port, pod = random.choice(endpoints)
        # Traffic only ever goes to 127.0.0.0/8 or into the stack's own pod network.
        assert ipaddress.ip_address(ip).is_loopback or (self.network is not None
                                                        and self.network.layout.contains(ip)), ip
        self._record(key, frontend, peer[1], (ip, port, pod))
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
        except (OSError, TimeoutError) as error:
            log.warning("Could not connect service %s to %s:%d (%s): %s", key, ip, port, pod, error)
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer, writer), _pipe(up_reader, writer, up_writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    def _record(self, key: str, frontend: str, client_port: int, endpoint: tuple[str, int, str] | None) -> None:
        self.connections += 1
        entry = {"t": round(time.time(), 4), "service": key, "frontend": frontend, "clientPort": client_port}
        if endpoint:
            entry.update(endpoint=f"{endpoint[0]}:{endpoint[1]}", pod=endpoint[2])
        self.conntrack.write(json.dumps(entry) + "\n")

    async def close(self) -> None:
        for key in list(self.services):
            await self.remove(key)
        self.conntrack.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter) -> None:
    """Copy one direction; EOF is passed on as a half-close, an error aborts both directions."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError, RuntimeError):
        for w in (writer, other):
            w.transport.abort()


# ------------------------------------------------------------------------------------------------------ agent


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node: str = args.node
        self.workdir: Path = args.workdir.resolve()
        self.venv_bin = str(Path(args.venv).resolve() / "bin")
        self.python = str(Path(self.venv_bin) / "python")
        self.catalogue = Catalogue(args.images, args.image_cache, str(Path(self.venv_bin) / "python"))
        self.ips = IPPool(args.pod_ip_prefix)
        # The pod network (--pod-network): pods of labelled namespaces get a network namespace and an address there.
        self.network = PodNetwork(args.pod_network, self.workdir) if args.pod_network else None
        if args.service_ip_prefix == args.pod_ip_prefix:
            raise ValueError(f"--service-ip-prefix and --pod-ip-prefix must differ (both {args.pod_ip_prefix})")
        self.node_hosts = ""  # the machine's /etc/hosts, which pods' hosts files end with
        with contextlib.suppress(OSError):
            self.node_hosts = Path("/etc/hosts").read_text()
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # uids of pods whose processes have been stopped and that were deleted
        self.stopping = False
        self.cgroup_name = f"shipyard-{self.node}-{os.getpid()}"
        self.cgroups: cgroups.Hierarchy | None = None  # where CPU limits go; None: not enforced
        self._topology = asyncio.Event()
        self.client: lightkube.AsyncClient
        self.http: aiohttp.ClientSession
        self.mountpoints: HostMountpoints
        self.proxy: ServiceProxy
        self._tasks: list[asyncio.Task[Any]] = []

    # -- helpers used by pods
    def topology_changed(self) -> None:
        self._topology.set()

    def forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]
            self.finished.add(worker.uid)
        self.topology_changed()

    def post_event(self, pod: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        stamp = now_iso()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{os.urandom(8).hex()}", "namespace": meta["namespace"]},
            "involvedObject": {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"],
                               "uid": meta["uid"], "apiVersion": "v1"},
            "reason": reason, "message": message[:1024], "type": type_, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet", "reportingInstance": self.node,
        }

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.client.create(codecs.from_dict(event), namespace=meta["namespace"])

        if not self.stopping:
            task = asyncio.create_task(send())
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    # -- main
    async def run(self, stop: asyncio.Event) -> None:
        self.cgroups = self._setup_cgroups()
        if self.cgroups is None and self.args.require_cpu_limits:
            raise SystemExit(1)
        ensure_traversable(REPO, Path(sys.prefix), Path(sys.base_prefix))
        for sub in ("logs", "pods", "pvc"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.client = lightkube.AsyncClient(config=KubeConfig.from_file(self.args.kubeconfig),
                                            field_manager=FIELD_MANAGER)
        self.http = aiohttp.ClientSession()
        self.mountpoints = HostMountpoints()
        self.proxy = ServiceProxy(self)
        try:
            if self.network is not None:
                await self.network.setup()
            if self.args.prepare_images:
                for build in sorted(self.catalogue.builds):
                    await self.catalogue.prepare(build)
            await self._register_node()
            if self.args.taint_fake_nodes:
                await self._taint_fake_nodes(add=True)
            loops = [self._heartbeat(), self._watch_pods(), self._watch_services(), self._write_targets()]
            background = [asyncio.create_task(coro) for coro in loops]
            self.write_targets()
            cpu_limits = {"version": self.cgroups.version, "mount": str(self.cgroups.mount),
                          "cgroup": self.cgroup_name} if self.cgroups else None
            pod_network = self.network.describe() if self.network is not None else None
            (self.workdir / "agent-ready").write_text(json.dumps({"pid": os.getpid(), "node": self.node,
                                                                  "cpuLimits": cpu_limits,
                                                                  "podNetwork": pod_network}) + "\n")
            log.info("Became ready: node %s, work directory %s", self.node, self.workdir)
            await stop.wait()
            log.info("Received termination; stopping %d pod(s)", len(self.workers))
            self.stopping = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await asyncio.gather(*(w.stop_for_shutdown(self.args.shutdown_grace) for w in list(self.workers.values())),
                                 return_exceptions=True)
            self.write_targets()
            with contextlib.suppress(Exception):
                await self.proxy.close()
            if self.args.taint_fake_nodes:
                with contextlib.suppress(Exception):
                    await self._taint_fake_nodes(add=False)
            with contextlib.suppress(Exception):
                await self.client.delete(Node, self.node)
                log.info("Deleted node %s", self.node)
        finally:
            if self.network is not None:
                with contextlib.suppress(Exception):
                    await self.proxy.close()  # its sockets in the stack's namespace first
                await self.network.teardown()
            self.mountpoints.cleanup()
            if self.cgroups is not None:
                cgroups.remove(self.cgroups.mount / self.cgroup_name)
            await self.http.close()
            await self.client.close()
            (self.workdir / "agent-ready").unlink(missing_ok=True)
            log.info("Stopped")

    def _setup_cgroups(self) -> cgroups.Hierarchy | None:
        hierarchy, problems = cgroups.setup(self.cgroup_name, self.args.mounts_file)
        if hierarchy is not None:
            log.info("Enforced CPU limits with %s (cgroup %s)%s", hierarchy.describe(), self.cgroup_name,
                     f"; before it: {'; '.join(problems)}" if problems else "")
            return hierarchy
        log.error("Found no cgroup v1 or v2 cpu controller this agent can use (%s): CPU LIMITS ARE NOT ENFORCED, pods "
                  "with resources.limits.cpu run unlimited and see no limit of their own%s", "; ".join(problems),
                  " (--require-cpu-limits: refusing to start)" if self.args.require_cpu_limits else "")
        return None

    def build_node(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {
                NODE_LABEL: "local", "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "type": "local"}},
            "spec": {},
        }

    def build_node_status(self) -> dict[str, Any]:
        stamp = now_iso()
        capacity = {"cpu": self.args.cpu, "memory": self.args.memory, "pods": str(self.args.max_pods)}

        def cond(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": self._node_started}

        return {"status": {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "osImage": "local processes",
                         "kernelVersion": os.uname().release, "kubeletVersion": "v0.0.0-shipyard-node-agent",
                         "kubeProxyVersion": "", "containerRuntimeVersion": "shipyard-local://0",
                         "machineID": "", "systemUUID": "", "bootID": ""},
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "shipyard node agent is posting ready status"),
            ],
        }}

    async def _register_node(self) -> None:
        self._node_started = now_iso()
        try:
            await self.client.create(codecs.from_dict(self.build_node()))
            log.info("Registered node %s", self.node)
        except lightkube.ApiError as error:
            if error.status.code != 409:
                raise
            log.info("Found node %s registered already", self.node)
        await self._post_node_status()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            node = (await self.client.get(Node, self.node)).to_dict()
            taints = (node.get("spec") or {}).get("taints") or []
            if not any(t["key"].startswith("node.kubernetes.io/not-ready") for t in taints):
                return
            await asyncio.sleep(0.5)
        log.warning("Node %s still has a not-ready taint after 60 s", self.node)

    async def _post_node_status(self) -> None:
        await self.client.patch(Node.Status, self.node, self.build_node_status(), patch_type=PatchType.MERGE)
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        await self.client.apply(codecs.from_dict(lease), name=self.node, namespace="kube-node-lease",
                                field_manager=FIELD_MANAGER, force=True)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._post_node_status()
            except Exception as error:  # noqa: BLE001 - retried at the next beat
                log.warning("Could not post the status of node %s: %s", self.node, error)

    async def _taint_fake_nodes(self, add: bool) -> None:
        async for node in self.client.list(Node):
            body = node.to_dict()
            if ((body["metadata"].get("annotations") or {}).get(FAKE_NODE_ANNOTATION)) != "fake":
                continue
            taints = [t for t in (body.get("spec") or {}).get("taints") or [] if t["key"] != FAKE_TAINT["key"]]
            if add:
                taints.append(dict(FAKE_TAINT))
            await self.client.patch(Node, body["metadata"]["name"], {"spec": {"taints": taints}},
                                    patch_type=PatchType.MERGE)
            log.info("%s node %s with %s", "Tainted" if add else "Untainted", body["metadata"]["name"],
                     f"{FAKE_TAINT['key']}={FAKE_TAINT['value']}:{FAKE_TAINT['effect']}")

    async def _watch_pods(self) -> None:
        while True:
            try:
                async for op, obj in self.client.watch(Pod, namespace="*", fields={"spec.nodeName": self.node}):
                    self._on_pod(op, obj.to_dict())
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the watch restarts
                log.warning("Restarted the pod watch: %s", error)
                await asyncio.sleep(1)

    def _on_pod(self, op: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if op == "DELETED":
            if worker is not None:
                worker.update({**pod, "metadata": {**pod["metadata"], "deletionGracePeriodSeconds": 0,
                                                   "deletionTimestamp": pod["metadata"].get("deletionTimestamp")
                                                   or now_iso()}})
            return
        if worker is None:
            if uid in self.finished:
                return
            if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get("phase") in ("Succeeded",
                                                                                                   "Failed"):
                # A finished pod of an earlier agent, or one deleted before it started: only the object is left.
                if pod["metadata"].get("deletionTimestamp"):
                    task = asyncio.create_task(self._delete_now(pod))
                    self._tasks.append(task)
                    task.add_done_callback(self._tasks.remove)
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            log.info("Admitted pod %s/%s", worker.ns, worker.name)
            worker.start()
        worker.update(pod)

    async def _delete_now(self, pod: dict[str, Any]) -> None:
        with contextlib.suppress(lightkube.ApiError):
            await self.client.delete(Pod, pod["metadata"]["name"], namespace=pod["metadata"]["namespace"],
                                     grace_period=0)

    async def _watch_services(self) -> None:
        while True:
            try:
                async for op, obj in self.client.watch(Service, namespace="*"):
                    await self.proxy.sync(obj.to_dict(), deleted=op == "DELETED")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the watch restarts
                log.warning("Restarted the service watch: %s", error)
                await asyncio.sleep(1)

    def write_targets(self) -> None:
        groups = []
        for worker in sorted(self.workers.values(), key=lambda w: w.key):
            if not worker.ip or not worker.running():
                continue
            annotated = (worker.pod["metadata"].get("annotations") or {}).get(PORT_ANNOTATION)
            ports = [int(annotated)] if annotated else [p for n in SCRAPE_PORT_NAMES
                                                        if (p := worker.port_by_name(n)) is not None]
            for port in ports:
                groups.append({"targets": [f"{worker.ip}:{port}"],
                               "labels": {"namespace": worker.ns, "pod": worker.name, "node": self.node}})
        write_atomic(self.workdir / "prometheus-targets.json", json.dumps(groups, indent=2) + "\n")

    async def _write_targets(self) -> None:
        while True:
            await self._topology.wait()
            self._topology.clear()
            self.write_targets()
            await asyncio.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", type=Path, required=True, help="pods, PVCs, logs, targets, services.json")
    parser.add_argument("--node", default="local-0")
    parser.add_argument("--images", type=Path, default=REPO / "hack" / "e2e-images.yaml")
    parser.add_argument("--image-cache", type=Path,
                        default=Path(os.environ.get("SHIPYARD_CACHE", Path.home() / ".cache" / "shipyard"))
                        / "e2e-images")
    parser.add_argument("--venv", default=str(REPO / ".venv"), help="virtualenv whose bin/ is on pods' PATH")
    parser.add_argument("--pod-ip-prefix", default="127.0.10", help="pod IPs are <prefix>.2-254 (loopback only)")
    parser.add_argument("--service-ip-prefix", default="127.0.254",
                        help="Services' virtual IPs are <prefix>.1-254 (loopback only, apart from the pod IPs)")
    parser.add_argument("--pod-network", metavar="CIDR",
                        help="a private IPv4 CIDR (e.g. 10.213.0.0/16): pods of namespaces labelled "
                             f"{POD_NETWORK_LABEL}={POD_NETWORK_BRIDGE} get a network namespace and an address there, "
                             "on a bridge in a network namespace of the agent's own; absent: every pod on loopback")
    parser.add_argument("--cpu", default="16")
    parser.add_argument("--memory", default="64Gi")
    parser.add_argument("--max-pods", type=int, default=50)
    parser.add_argument("--taint-fake-nodes", action="store_true",
                        help="taint the KWOK nodes shipyard.dev/fake=true:NoSchedule while the agent runs")
    parser.add_argument("--prepare-images", action="store_true", help="build the catalogue's contents before ready")
    parser.add_argument("--shutdown-grace", type=float, default=15.0,
                        help="at shutdown, the longest a pod's processes get after SIGTERM")
    parser.add_argument("--require-cpu-limits", action="store_true",
                        help="exit 1 where CPU limits cannot be enforced (no usable cgroup v1 or v2 cpu controller)")
    parser.add_argument("--mounts-file", type=Path, default=Path("/proc/self/mounts"),
                        help="the mount table read to find the cgroup hierarchies (tests point it elsewhere)")
    parser.add_argument("--registry-ca", help="PEM CA bundle trusted for image volumes' registries (fetch --ca-bundle)")
    parser.add_argument("--registry-config", help="Docker config file with registry credentials for image volumes")
    parser.add_argument("--log-level", default="INFO")
    return parser


def ensure_traversable(*paths: Path) -> None:
    """Pods run as their securityContext user (e.g. 10001), but the "image" is this checkout and its venv: every
    directory above them must be searchable by their uid and gid (a checkout under a 0700 `mktemp -d` folder is not).
    """
    for path in paths:
        for directory in [path.resolve(), *path.resolve().parents]:
            mode = directory.stat().st_mode
            wanted = stat.S_IXGRP | stat.S_IXOTH  # group too: a pod running with gid 0 is judged by group bits
            if mode & wanted != wanted:
                os.chmod(directory, mode | wanted)
                log.info("Made %s searchable by pod users (g+x, o+x)", directory)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pod_network:
        try:
            plan_pod_network(args.pod_network)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("node_agent.py needs root (mount namespaces, bind mounts, cgroups)", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Agent(args).run(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
